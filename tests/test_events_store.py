"""Job logs on a store of their own (INFERQ_EVENTS_URL): a second Redis, and a real 3-master Redis Cluster.

Each case runs a private queue Redis (the fleet's events store is claimed there, and the
session's Redis serves processes with none), a real API process and a real worker
process with the URL in their environment, and checks what a user sees (streaming,
resume, cancel, a lost worker's job taken over by the reaper, a batch) and where the
keys went: every job stream on the events store, none on the queue's Redis.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis
import requests

from inferq.client import chunk_lines, parse_sse
from inferq.embedded_redis import EmbeddedRedis
from queue_schema import keys
from queue_schema.lifecycle import connection
from tests.conftest import ROOT, ApiProcess, WorkerProcess, wait_ready, wait_until
from tests.redis_cluster import redis_cluster  # noqa: F401

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module", params=["redis", "cluster"])
def store(request, tmp_path_factory):
    """(queue Redis URL, events URL, events client) for a second standalone Redis or the cluster."""
    queue = EmbeddedRedis(tmp_path_factory.mktemp("queue"), appendonly=False).start()
    if request.param == "redis":
        events = EmbeddedRedis(tmp_path_factory.mktemp("events"), appendonly=False).start()
        url, stop = events.url, events.stop
    else:
        cluster = request.getfixturevalue("redis_cluster")
        url, stop = cluster.url, (lambda: None)
    yield queue.url, url, connection.events_client(url)
    stop()
    queue.stop()


@pytest.fixture(scope="module")
def stack(store, tmp_path_factory, small_model, slow_model):
    queue_url, events_url, events = store
    tmp = tmp_path_factory.mktemp("stack")
    env = {**os.environ, "INFERQ_EVENTS_URL": events_url}
    api = ApiProcess(queue_url, tmp / "api.log", env=env, MAX_STREAMS_PER_TOKEN=50).start()
    workers = [_worker(queue_url, env, "small", small_model, tmp, "--parallel", "2"),
               _worker(queue_url, env, "slow", slow_model, tmp, "--parallel", "1")]
    yield api, workers, redis.Redis.from_url(queue_url), events, env, tmp
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGCONT)
            w.proc.kill()
            w.proc.wait()
    api.stop()


def _worker(queue_url, env, model, path, tmp, *extra) -> WorkerProcess:
    log_path = tmp / f"worker-{model}-{uuid.uuid4().hex[:6]}.log"
    cmd = [sys.executable, "-m", "inferq", "worker", "--model", f"{model}={path}", "--threads", "1",
           "--redis-url", queue_url, *extra]
    proc = subprocess.Popen(cmd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    worker = WorkerProcess(proc, model, log_path)
    wait_ready(queue_url, worker)
    return worker


def _submit(api, **fields) -> str:
    resp = requests.post(api.url + "/v1/jobs", json={"operation": "infer", **fields}, timeout=10)
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


def _stream(api, job_id, last_event_id=None, until=None) -> list[dict]:
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    with requests.get(f"{api.url}/v1/jobs/{job_id}/stream", headers=headers, stream=True, timeout=60) as resp:
        assert resp.status_code == 200, resp.text
        out = []
        for frame in parse_sse(chunk_lines(resp.iter_content(None))):
            if "data" not in frame or frame.get("event") in (None, "ping"):
                continue
            event = json.loads(frame["data"])
            out.append(event)
            if event["type"] in ("end", "error") or event["type"] == until:
                return out
    return out


def _logged(events, job_id) -> list[dict]:
    """The log's events as the stream sends them (without null fields)."""
    return [{k: v for k, v in json.loads(f[b"e"]).items() if v is not None}
            for _, f in events.xrange(keys.job_events(job_id)) if b"e" in f]


def _no_logs_on(queue: redis.Redis) -> None:
    assert not list(queue.scan_iter(match="inferq:job:*:events")), "a job stream on the queue's Redis"


def _settled(queue: redis.Redis, job_id: str) -> None:
    wait_until(lambda: queue.zscore(keys.OPEN_JOBS, job_id) is None and queue.exists(keys.job_settled(job_id)),
               what=f"{job_id}'s end settled on the queue's Redis")


def test_a_streamed_job_is_logged_on_the_events_store_only(stack):
    api, _, queue, events, _, _ = stack
    job_id = _submit(api, model="small", prompt="hello", max_tokens=12)
    streamed = _stream(api, job_id)
    assert [e["type"] for e in streamed][0] == "queued" and streamed[-1]["type"] == "end"
    assert [e["seq"] for e in streamed] == list(range(len(streamed)))
    tokens = [e for e in streamed if e["type"] == "token"]
    assert 1 <= len(tokens) <= 12
    assert _logged(events, job_id) == streamed  # the live relay and the log agree, event for event
    _settled(queue, job_id)
    _no_logs_on(queue)
    assert requests.get(f"{api.url}/v1/jobs/{job_id}", timeout=5).json()["state"] == "finished"


def test_a_stream_resumes_from_any_seq(stack):
    api, *_ = stack
    job_id = _submit(api, model="small", prompt="resume me", max_tokens=10)
    whole = _stream(api, job_id)
    for after in (0, 3, len(whole) - 2):
        assert _stream(api, job_id, last_event_id=after) == whole[after + 1:]


def test_cancel_a_queued_and_a_running_job(stack):
    api, _, queue, events, _, _ = stack
    running = _submit(api, model="slow", prompt="long", max_tokens=2000)
    _stream(api, running, until="token")
    queued = _submit(api, model="slow", prompt="behind it", max_tokens=5)
    for job_id in (queued, running):
        assert requests.delete(f"{api.url}/v1/jobs/{job_id}", timeout=5).status_code in (200, 202)
    for job_id in (queued, running):
        last = _stream(api, job_id)[-1]
        assert last["type"] == "end" and last["stop_reason"] == "cancelled", last
        logged = _logged(events, job_id)
        assert sum(1 for e in logged if e["type"] in ("end", "error")) == 1
        _settled(queue, job_id)
    _no_logs_on(queue)


def test_a_frozen_workers_job_is_taken_over_and_its_late_writes_are_fenced(stack):
    api, workers, queue, events, _, _ = stack
    slow = workers[1]
    job_id = _submit(api, model="slow", prompt="freeze", max_tokens=2000)
    _stream(api, job_id, until="token")
    os.kill(slow.proc.pid, signal.SIGSTOP)
    try:
        # The API process's reaper sees the lease stand still (INFERQ_LEASE_STALE_S) and ends the job.
        wait_until(lambda: (_logged(events, job_id) or [{}])[-1].get("type") == "error", timeout=60,
                   what="the reaper's end of the frozen worker's job")
    finally:
        os.kill(slow.proc.pid, signal.SIGCONT)
    time.sleep(2)  # the thawed worker tries to write on: the fence (the log's ids) refuses it
    logged = _logged(events, job_id)
    terminal = [e for e in logged if e["type"] in ("end", "error")]
    assert len(terminal) == 1 and terminal[0]["code"] == "WORKER_LOST" and logged[-1] == terminal[0]
    assert [e["seq"] for e in logged] == list(range(len(logged)))
    _settled(queue, job_id)
    # The thawed worker gives up the job and serves again.
    wait_until(lambda: requests.post(api.url + "/v1/jobs", json={"operation": "infer", "model": "slow",
                                                                 "prompt": "again", "max_tokens": 1},
                                     timeout=10).status_code == 202, what="the slow model to take jobs")


def test_a_process_naming_another_events_store_refuses_to_start(store, stack, small_model):
    url, env = store[0], stack[4]
    other = {**env, "INFERQ_EVENTS_URL": ""}  # the queue's own Redis: not what the fleet uses
    out = subprocess.run([sys.executable, "-m", "inferq", "worker", "--model", f"x={small_model}",
                          "--redis-url", url], env=other, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "INFERQ_EVENTS_URL" in out.stderr + out.stdout, out.stderr + out.stdout


def _chat_line(custom_id, content):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "small", "messages": [{"role": "user", "content": content}], "max_tokens": 3,
                     "temperature": 0}}


def test_a_batch_runs_with_its_jobs_logs_on_the_events_store(stack):
    import openai

    api, _, queue, events, _, _ = stack
    oai = openai.OpenAI(base_url=f"{api.url}/v1", api_key="none", max_retries=0, timeout=30)
    rows = [_chat_line(f"line-{i}", f"say {i}") for i in range(5)]
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    uploaded = oai.files.create(file=("requests.jsonl", body), purpose="batch")
    batch = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_until(lambda: (lambda b: b if b.status in ("completed", "failed") else None)(
        oai.batches.retrieve(batch.id)), timeout=90, interval=0.2, what="the batch to end")
    assert done.status == "completed" and done.request_counts.completed == 5, done
    out = [json.loads(line) for line in oai.files.content(done.output_file_id).text.splitlines()]
    assert sorted(row["custom_id"] for row in out) == [f"line-{i}" for i in range(5)]
    for row in out:
        job_id = row["response"]["request_id"]
        answer = row["response"]["body"]["choices"][0]["message"]["content"]
        logged = _logged(events, job_id)
        assert "".join(e["t"] for e in logged if e["type"] == "token") == answer
        assert logged[-1]["type"] == "end"
    _no_logs_on(queue)


def test_a_soak_of_1000_jobs_with_a_worker_killed_ends_each_exactly_once(store, stack, small_model):
    """1,000 one-token jobs from 8 clients while the small model's worker is killed (-9) and started again:
    each job ends exactly once in its log, and is settled (nothing left open)."""
    from concurrent.futures import ThreadPoolExecutor

    api, workers, queue, events, env, tmp = stack
    if store[1].startswith("redis://"):
        pytest.skip("the soak runs on the cluster (the standalone store's path is the same code, cheaper)")
    session = requests.Session()

    def submit(i):
        for _ in range(200):
            resp = session.post(api.url + "/v1/jobs", json={"operation": "infer", "model": "small",
                                                            "prompt": f"soak {i}", "max_tokens": 1}, timeout=30)
            if resp.status_code == 202:
                return resp.json()["job_id"]
            assert resp.status_code in (429, 503), resp.text  # offline while the worker restarts: retried
            time.sleep(0.1)
        raise AssertionError("never admitted")

    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(submit, range(500)))
        small = workers[0]
        small.proc.kill()
        small.proc.wait()
        workers[0] = _worker(store[0], env, "small", small_model, tmp, "--parallel", "2")
        job_ids = first + list(pool.map(submit, range(500, 1000)))
    assert len(set(job_ids)) == 1000
    try:
        wait_until(lambda: queue.zcard(keys.OPEN_JOBS) == 0, timeout=180, interval=1, what="every soak job settled")
    except AssertionError:
        left = [j.decode() for j in queue.zrange(keys.OPEN_JOBS, 0, 4)]
        raise AssertionError(f"{queue.zcard(keys.OPEN_JOBS)} open, e.g. " + "; ".join(
            f"{j}: rq={queue.hget(keys.rq_job(j), 'status')} lease={queue.hgetall(keys.job_lease(j))} "
            f"settling={queue.zscore(keys.SETTLING, j)} log={_logged(events, j)[-2:]}" for j in left) +
            f"\nworker log:\n{workers[0].log()[-3000:]}")
    pipe = events.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.xrange(keys.job_events(job_id))
    ended = {"end": 0, "error": 0}
    for job_id, entries in zip(job_ids, pipe.execute()):
        logged = [json.loads(f[b"e"]) for _, f in entries if b"e" in f]
        terminal = [e for e in logged if e["type"] in ("end", "error")]
        assert len(terminal) == 1 and logged[-1] is terminal[0], (job_id, logged)
        assert [e["seq"] for e in logged] == list(range(len(logged))), (job_id, logged)
        ended[terminal[0]["type"]] += 1
        if terminal[0]["type"] == "error":
            assert terminal[0]["code"] == "WORKER_LOST", terminal[0]
    assert ended["end"] >= 990, ended  # only jobs the killed worker had streamed a token of may fail
    _no_logs_on(queue)


def test_a_master_killed_mid_run_fails_over_and_its_job_goes_on_or_ends_clearly(store, stack, request):
    """The events cluster loses the master of a running job's slot: its replica takes over, and the job's log
    ends exactly once, gap-free; a client resuming from the last id it saw reads on without a splice."""
    if not store[1].startswith("redis+cluster://"):
        pytest.skip("a failover is the cluster's")
    cluster = request.getfixturevalue("redis_cluster")
    api, _, queue, events, _, _ = stack
    job_id = _submit(api, model="slow", prompt="failover", max_tokens=300)
    seen = _stream(api, job_id, until="token")
    master = cluster.master_for_key(keys.job_events(job_id))
    cluster.kill(master)
    cluster.wait_failover(master)
    wait_until(lambda: _resumed(api, job_id, seen), timeout=120, interval=0.5, what="the job's end after failover")
    rest = _resumed(api, job_id, seen)
    whole = seen + rest
    assert [e["seq"] for e in whole] == list(range(len(whole)))
    assert [e["type"] for e in whole].count("end") + [e["type"] for e in whole].count("error") == 1
    assert whole[-1]["type"] in ("end", "error")
    if whole[-1]["type"] == "error":  # the events written while no master answered could not wait longer
        assert whole[-1]["message"], whole[-1]
    _settled(queue, job_id)
    _no_logs_on(queue)


def _resumed(api, job_id, seen) -> list[dict] | None:
    """The rest of the job's stream after ``seen``, if it has ended; None while the API cannot serve it yet."""
    try:
        rest = _stream(api, job_id, last_event_id=seen[-1]["seq"])
    except (requests.RequestException, AssertionError):
        return None
    return rest if rest and rest[-1]["type"] in ("end", "error") else None


@pytest.fixture()
def two_stores(tmp_path):
    """A queue Redis and an events Redis of this test's own, the second to be stopped mid-way."""
    queue = EmbeddedRedis(tmp_path / "queue", appendonly=False).start()
    events = EmbeddedRedis(tmp_path / "events", appendonly=False).start()
    yield queue, events
    for server in (queue, events):
        try:
            server.stop()
        except Exception:  # the test stopped it already
            pass


def test_the_events_store_failing_between_admission_and_take_loses_no_job(two_stores):
    """The two-store steps fail in the middle: the admission is kept (its queued event written later by the
    reaper's sweep), and a take whose fence cannot be written gives its job straight back to its queue."""
    from queue_schema.lifecycle.admission import Admission
    from queue_schema.lifecycle.eventlog import EventLog
    from queue_schema.lifecycle.leases import Leases
    from queue_schema.lifecycle.reaper import Reaper
    from queue_schema.operations import InferOperation
    from tests.helpers import serve_fake_model

    queue_server, events_server = two_stores
    queue, events = redis.Redis.from_url(queue_server.url), redis.Redis.from_url(events_server.url)
    log = EventLog(events, queue=queue)
    serve_fake_model(queue, "m")
    op = InferOperation(operation="infer", model="m", prompt="x", max_tokens=1)
    events_server.stop()
    admitted = Admission(queue, eventlog=log).admit(op, 10)  # admitted, though its event could not be written
    queue_key = keys.rq_queue(admitted.queue)
    assert queue.lrange(queue_key, 0, -1) == [admitted.job_id.encode()]
    taken = Leases(queue, log).acquire("w1", "w1", [keys.queue_name("m", "normal")], 1, 0, "now")
    assert taken == []  # its fence could not be written: back at the front of its queue, not stranded
    assert queue.lrange(queue_key, 0, -1) == [admitted.job_id.encode()]
    assert queue.hget(keys.rq_job(admitted.job_id), "status") == b"queued"
    assert not queue.exists(keys.job_lease(admitted.job_id))
    events_server.start()
    events = redis.Redis.from_url(events_server.url)
    log = EventLog(events, queue=queue)
    queue.zadd(keys.OPEN_JOBS, {admitted.job_id: 0})  # old enough for the sweep
    assert (admitted.job_id, "queued event written") in Reaper(queue, "r1", log).sweep()
    assert [e.type for e in log.replay(admitted.job_id)] == ["queued"]
    assert queue.zscore(keys.OPEN_JOBS, admitted.job_id) is not None  # still open: it has not run
    taken = Leases(queue, log).acquire("w1", "w1", [keys.queue_name("m", "normal")], 1, 0, "now")
    assert [(t.job_id, t.next_seq, t.closed) for t in taken] == [(admitted.job_id, 1, False)]


def test_narration_is_replayed_from_the_queues_redis(two_stores):
    from queue_schema.events import Narration
    from queue_schema.lifecycle.eventlog import EventLog

    queue_server, events_server = two_stores
    queue, events = redis.Redis.from_url(queue_server.url), redis.Redis.from_url(events_server.url)
    log = EventLog(events, queue=queue)
    log.append(Narration(actor="w1", action="loading", target="m", human="Loading m"))
    assert [e.human for e in log.recent_narration()] == ["Loading m"]
    assert not events.exists(keys.NARRATION_LOG)
