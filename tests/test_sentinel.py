"""Redis Sentinel for real: a master, a replica and a sentinel of each test's own, with passwords.

Failovers are forced two ways: ``SENTINEL FAILOVER`` (the old master stays up and
is demoted: clients must notice the READONLY answers and move) and ``kill -9`` of
the master (clients must wait for the sentinel to promote the replica).
"""
from __future__ import annotations

import secrets
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests

from inferq.client import Client
from inferq.embedded_redis import free_port, redis_server_binary
from queue_schema.lifecycle import connection, registry
from queue_schema.lifecycle.connection import RedisURLError, masked, parse_sentinel
from queue_schema.lifecycle.eventlog import EventLog
from tests.conftest import ApiProcess, start_worker, wait_until

SERVICE = "inferq"


class Node:
    """One redis-server process (a data node or a sentinel): loopback only, no snapshots,
    its settings (passwords included) in a file only its owner can read."""

    def __init__(self, tmp: Path, name: str, lines: list[str], password: str, sentinel: bool = False):
        self.port = free_port()
        self.dir = tmp / name
        self.dir.mkdir(parents=True)
        self.password = password
        self.log_path = self.dir / "node.log"
        conf = self.dir / "node.conf"  # a sentinel rewrites its file: it must be writable
        persistence = [] if sentinel else ['save ""', "appendonly no"]
        conf.write_text("\n".join([f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}",
                                   f"logfile {self.log_path}", f"requirepass {password}", *persistence,
                                   *lines]) + "\n")
        conf.chmod(0o600)
        self.proc = subprocess.Popen([redis_server_binary(), str(conf), *(["--sentinel"] if sentinel else [])],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, password=password, socket_timeout=2, socket_connect_timeout=1)

    def wait_up(self) -> "Node":
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.client.ping()
            except redis.ConnectionError:
                return False

        wait_until(up, timeout=10, what=f"redis-server on {self.port}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@dataclass
class Cluster:
    master: Node
    replica: Node
    sentinel: Node
    password: str
    sentinel_password: str
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return (f"redis+sentinel://:{self.password}@127.0.0.1:{self.sentinel.port}/{SERVICE}/0"
                f"?sentinel_password={self.sentinel_password}")

    def master_port(self) -> int:
        host, port = self.sentinel.client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def node(self, port: int) -> Node:
        return next(n for n in (self.master, self.replica) if n.port == port)

    def logs(self) -> str:
        return "\n".join(f"--- {n.dir.name}\n{n.log()[-3000:]}" for n in self.nodes)


@contextmanager
def sentinel_cluster(tmp: Path):
    """A master, its replica and one sentinel watching them (quorum 1), all stopped on exit."""
    password, sentinel_password = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    nodes: list[Node] = []
    try:
        master = Node(tmp, "master", [f"masterauth {password}"], password)
        nodes.append(master.wait_up())
        replica = Node(tmp, "replica", [f"masterauth {password}", f"replicaof 127.0.0.1 {master.port}"], password)
        nodes.append(replica.wait_up())
        sentinel = Node(tmp, "sentinel", [
            f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 1",
            f"sentinel auth-pass {SERVICE} {password}",
            f"sentinel down-after-milliseconds {SERVICE} 1000",
            f"sentinel failover-timeout {SERVICE} 3000",
        ], sentinel_password, sentinel=True)
        nodes.append(sentinel.wait_up())
        cluster = Cluster(master, replica, sentinel, password, sentinel_password, nodes)

        def replica_known():
            if replica.client.info("replication").get("master_link_status") != "up":
                return False
            known = sentinel.client.execute_command("SENTINEL", "REPLICAS", SERVICE)
            return any(b"s_down" not in _fields(r).get(b"flags", b"s_down") for r in known)

        wait_until(replica_known, timeout=15, what="the sentinel to see the replica in sync")
        yield cluster
    finally:
        for node in reversed(nodes):
            node.stop()


def _fields(reply) -> dict:
    return dict(zip(reply[::2], reply[1::2])) if isinstance(reply, list) else reply


@pytest.fixture()
def cluster(tmp_path):
    with sentinel_cluster(tmp_path) as c:
        yield c


# --- the URL ------------------------------------------------------------------------

def test_sentinel_urls_are_read_as_rq_dashboard_reads_them():
    target = parse_sentinel("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/svc/3?sentinel_password=spw"
                            "&socket_timeout=4", socket_timeout=10, socket_connect_timeout=2)
    assert target.hosts == [("10.0.0.1", 26379), ("10.0.0.2", 26379)] and target.service == "svc"
    # The URL's own options win over the caller's, as redis-py's from_url does for redis:// URLs.
    assert target.client_options == {"socket_timeout": 4.0, "socket_connect_timeout": 2, "password": "pw", "db": 3}
    assert target.sentinel_options["password"] == "spw"
    # Sentinels get a time-out even when the data connections have none (a worker's BLPOP).
    assert target.sentinel_options["socket_timeout"] > 0 and target.sentinel_options["socket_connect_timeout"] > 0
    assert parse_sentinel("redis+sentinel://h:1/svc").client_options == {"db": 0}

    for bad, why in [("redis+sentinel://h:1", "names no service"), ("redis+sentinel://h:1/", "names no service"),
                     ("redis+sentinel://u:pw@h:1/svc", "not a user name"),
                     ("redis+sentinel://:p%40ss@h:1/svc", "percent-decoding"),
                     ("redis+sentinel://h:1/svc?client_type=slave", "needs the master"),
                     ("redis+sentinel://h:port/svc", "cannot read")]:
        with pytest.raises(RedisURLError, match=why):
            parse_sentinel(bad)
    url = "redis+sentinel://:pw@h:1,h:2/svc/0?sentinel_password=spw&socket_timeout=4"
    assert masked(url) == "redis+sentinel://:***@h:1,h:2/svc/0?sentinel_password=***&socket_timeout=4"


def test_the_api_refuses_a_sentinel_url_it_cannot_use_in_one_line():
    from api import create_app
    from queue_schema.errors import ConfigError

    with pytest.raises(ConfigError, match="REDIS_URL: .*names no service"):
        create_app({"REDIS_URL": "redis+sentinel://127.0.0.1:1", "TESTING": True})


# --- clients through a failover -------------------------------------------------------

def test_clients_and_the_bounded_pool_follow_a_failover(cluster):
    plain = connection.client(cluster.url, socket_connect_timeout=2, socket_timeout=5)
    bounded = connection.blocking_client(cluster.url, max_connections=2, timeout=0.3, socket_connect_timeout=2,
                                         socket_timeout=5)
    pool = bounded.connection_pool
    assert plain.set("before", "1") and bounded.get("before") == b"1"
    assert cluster.master_port() == cluster.master.port

    # The bound holds: a third caller waits for the timeout, then gets ConnectionError.
    held = [pool.get_connection(), pool.get_connection()]
    t0 = time.monotonic()
    with pytest.raises(redis.ConnectionError, match="No connection available"):
        pool.get_connection()
    assert 0.25 < time.monotonic() - t0 < 2
    pool.release(held[0])
    stale = held[1]  # in use across the failover: the pool must not take it back afterwards

    cluster.sentinel.client.execute_command("SENTINEL", "FAILOVER", SERVICE)
    wait_until(lambda: cluster.master_port() == cluster.replica.port, timeout=15, what="the failover")
    # The old master is still up. The sentinel demotes it at its next look (within its 10 s INFO
    # period); doing so here keeps the test short. Its READONLY answers then send the clients on.
    cluster.master.client.execute_command("REPLICAOF", "127.0.0.1", cluster.replica.port)

    def writes(client, key):
        try:
            return client.set(key, "1")
        except redis.ConnectionError:  # the first command after the move may meet the old master
            return False

    wait_until(lambda: writes(plain, "after-plain"), timeout=10, what="the client to follow the master")
    wait_until(lambda: writes(bounded, "after-bounded"), timeout=10, what="the pool to follow the master")
    new_master = cluster.replica.client
    assert new_master.get("before") == b"1" and new_master.get("after-plain") == b"1"
    assert new_master.get("after-bounded") == b"1"
    assert pool.connection_kwargs["connection_pool"].master_address == ("127.0.0.1", cluster.replica.port)
    pool.release(stale)
    held = [pool.get_connection(), pool.get_connection()]
    assert all(c.port == cluster.replica.port for c in held)
    # The connection to the old master was dropped, not kept: the pool holds its bound, no more.
    assert len(pool._connections) == 2
    with pytest.raises(redis.ConnectionError, match="No connection available"):
        pool.get_connection()
    for conn in held:
        pool.release(conn)


def test_the_embedded_dashboard_reads_a_sentinel_url(cluster):
    from api import create_app

    client = connection.client(cluster.url)
    client.rpush("rq:queue:inferq.dash.normal", "x")
    client.sadd("rq:queues", "rq:queue:inferq.dash.normal")
    app = create_app({"REDIS_URL": cluster.url, "TESTING": True}).test_client()
    resp = app.get("/rq/0/data/queues.json")
    assert resp.status_code == 200, resp.get_data(as_text=True)[:500]
    assert any(q["name"] == "inferq.dash.normal" and q["count"] == 1 for q in resp.get_json()["queues"])


# --- the whole stack through kill -9 of the master ------------------------------------------

class Submitter(threading.Thread):
    """Submits short jobs until told to stop (or a bound is reached), recording every answer."""

    def __init__(self, api_url: str, model: str, limit: int = 400, seconds: float = 45):
        super().__init__(daemon=True)
        self.api_url, self.model, self.limit, self.seconds = api_url, model, limit, seconds
        self.answers: list[tuple[float, int, str | None]] = []  # (time, status, job id if accepted)
        self.stop = threading.Event()

    def run(self):
        deadline = time.monotonic() + self.seconds
        with requests.Session() as http:
            while not self.stop.is_set() and len(self.answers) < self.limit and time.monotonic() < deadline:
                body = {"operation": "infer", "model": self.model, "prompt": f"job {len(self.answers)}",
                        "max_tokens": 4, "temperature": 0}
                t = time.monotonic()
                try:
                    resp = http.post(f"{self.api_url}/v1/jobs", json=body, timeout=30)
                    job = resp.json().get("job_id") if resp.status_code == 202 else None
                    self.answers.append((t, resp.status_code, job))
                except requests.RequestException:
                    self.answers.append((t, 0, None))  # the API itself did not answer
                self.stop.wait(0.05)


class Watcher(threading.Thread):
    """Reads one job's stream with the Python client (it resumes with Last-Event-ID by itself)."""

    def __init__(self, api_url: str, job_id: str):
        super().__init__(daemon=True)
        self.client, self.job_id = Client(api_url), job_id
        self.events: list[dict] = []
        self.error: Exception | None = None

    def run(self):
        try:
            for event in self.client.events(self.job_id):
                self.events.append(event)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_killing_the_master_fails_over_without_a_500_a_broken_stream_or_a_dead_worker(cluster, tmp_path,
                                                                                     slow_model):
    url = cluster.url
    worker = start_worker(url, "ha", slow_model, tmp_path, wait=False)
    api = ApiProcess(url, tmp_path / "api.log").start(wait=False)  # up once the cluster is
    api_url = api.url
    submitter = None
    try:
        data = connection.client(url, socket_timeout=2)

        def worker_idle():
            assert worker.proc.poll() is None, worker.log()
            try:
                return any(w.model == "ha" and w.state == "idle" for w in registry.live_workers(data))
            except redis.ConnectionError:
                return False

        wait_until(worker_idle, timeout=60, what="the worker")
        wait_until(lambda: _ready(api_url, api.proc), timeout=30, what="the API")

        submitter = Submitter(api_url, "ha")
        submitter.start()
        time.sleep(1)
        # Two long jobs streaming across the kill, which comes as soon as both are under way (a fast
        # machine may reach EOS within seconds); the deadline ends them whatever this machine's speed.
        client = Client(api_url)
        watchers = [Watcher(api_url, client.submit("go", model="ha", max_tokens=4000, temperature=0,
                                                   repetition_penalty=1.0, timeout_s=6)["job_id"])
                    for _ in range(2)]
        for w in watchers:
            w.start()
        wait_until(lambda: all(any(e["type"] == "token" for e in w.events) for w in watchers), timeout=30,
                   interval=0.01, what="both streams to be under way")

        old_port = cluster.master.port
        cluster.master.proc.send_signal(signal.SIGKILL)
        killed, killed_wall = time.monotonic(), time.time()
        seen_at_kill = [len(w.events) for w in watchers]
        wait_until(lambda: cluster.master_port() != old_port, timeout=30, interval=0.1, what="the promotion")
        promoted = time.monotonic() - killed
        assert cluster.master_port() == cluster.replica.port
        new_log = EventLog(cluster.replica.client)

        def a_new_job_ended():
            for t, status, job in list(submitter.answers):
                if t > killed and job is not None:
                    last = new_log.last(job)
                    if last is not None and last.type == "end":
                        return t - killed, time.monotonic() - killed
            return None

        submitted_after, ended_after = wait_until(a_new_job_ended, timeout=30, interval=0.1,
                                                  what="a job submitted after the kill to end on the new master")
        time.sleep(1)  # a little traffic on the new master too
        submitter.stop.set()
        submitter.join(35)
        for w in watchers:
            w.join(40)

        statuses = [status for _, status, _ in submitter.answers]
        odd = sorted({s for s in statuses if not (200 <= s < 300 or 400 <= s < 500 or s == 503)})
        assert not odd, (odd, _tail(tmp_path / "api.log"))
        assert 503 in statuses, "the kill never reached the API: the test did not test a failover"
        for w in watchers:
            assert not w.is_alive() and w.error is None, (w.job_id, w.error, w.events[-3:])
            seqs = [e["seq"] for e in w.events]
            assert seqs == list(range(len(seqs))), (w.job_id, seqs)
            assert w.events[-1]["type"] in ("end", "error"), w.events[-1]
            # What the stream said is what the new master holds: nothing reordered or invented.
            assert [e.seq for e in new_log.replay(w.job_id)] == seqs
        # Both streams were open across the failover: they ended on the new master, after the kill.
        for w, seen in zip(watchers, seen_at_kill):
            assert seen < len(w.events) and w.events[-1]["ts"] / 1000 > killed_wall, (w.job_id, seen)
        # Usually the API's pub/sub connection goes down with the master and the streams are cut
        # (the client resumes them); if it reconnects before it notices, the relay fills the gap.
        cut = "pub/sub connection lost" in (tmp_path / "api.log").read_text(errors="replace")
        assert worker.proc.poll() is None, worker.log()
        accepted = [job for _, status, job in submitter.answers if job]
        unknown = [job for job in accepted if new_log.last(job) is None]
        print(f"\nfailover: promoted {promoted:.1f} s after the kill; first job submitted after it ended "
              f"{ended_after:.1f} s after (submitted at +{submitted_after:.1f} s); answers "
              f"{ {s: statuses.count(s) for s in sorted(set(statuses))} }; accepted jobs the new master "
              f"never saw: {len(unknown)} of {len(accepted)}; stream ends "
              f"{[w.events[-1].get('code') or w.events[-1]['type'] for w in watchers]} (cut and resumed: {cut})")
    finally:
        if submitter is not None:
            submitter.stop.set()
        api.stop()
        worker.stop(signal.SIGKILL)


def _ready(api_url: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, "gunicorn exited"
    try:
        return requests.get(api_url + "/ready", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""
