"""Redis Sentinel for real: a master, a replica and a sentinel of each test's own, with passwords.

Failovers are forced two ways: ``SENTINEL FAILOVER`` (the old master stays up and
is demoted: clients must notice the READONLY answers and move) and ``kill -9`` of
the master (clients must wait for the sentinel to promote the replica).
"""
from __future__ import annotations

import os
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
from queue_schema import connection, registry
from queue_schema.connection import RedisURLError, masked, parse_sentinel
from queue_schema.eventlog import EventLog
from tests.conftest import GUNICORN, ROOT, start_worker, wait_until

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
    from api.config import ConfigError

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
