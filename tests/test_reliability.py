"""Break things for real: kill workers, restart Redis, overrun deadlines, feed bad files."""
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import redis
from rq import Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from api import create_app
from inferq.embedded_redis import EmbeddedRedis
from inferq.testmodel import make_llama_gguf
from queue_schema import keys
from queue_schema.lifecycle import registry
from tests.conftest import ROOT, start_api, start_worker, wait_until
from tests.helpers import events, submit, text_of

LONG_PROMPT = "the data model of the queue worker " * 120  # ~3,000 tokens: ~2 s of prompt evaluation


def worker_running(r, job_id):
    return next((w for w in registry.live_workers(r) if w.current_job == job_id), None)


def test_killed_worker_mid_job_gives_worker_lost_and_nothing_else_is_lost(client, r, worker_factory, slow_model):
    a, b = worker_factory("lost", slow_model), worker_factory("lost", slow_model)
    victim = submit(client, model="lost", prompt="go", max_tokens=3500, repetition_penalty=1.0, temperature=0)
    assert events(client, victim, until="token")[-1]["type"] == "token"
    running = wait_until(lambda: worker_running(r, victim), what="the job's worker")
    killed = a if running.pid == a.proc.pid else b
    survivor = b if killed is a else a
    other = submit(client, model="lost", prompt="other", max_tokens=20, temperature=0)
    killed.proc.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    evts = events(client, victim)
    lost_after = time.monotonic() - t0
    assert evts[-1]["type"] == "error" and evts[-1]["code"] == "WORKER_LOST" and evts[-1]["retriable"]
    assert lost_after < 15
    assert [e["seq"] for e in evts] == list(range(len(evts)))
    assert client.get(f"/v1/jobs/{victim}").get_json()["state"] == "failed"
    # The other job finishes on the survivor, exactly once.
    other_events = events(client, other)
    assert other_events[-1]["type"] == "end" and other_events[-1]["tokens_out"] <= 20
    assert [e["type"] for e in other_events].count("started") == 1
    assert survivor.proc.poll() is None


def test_worker_killed_before_the_first_token_is_requeued_once(client, r, worker_factory, slow_model):
    a, b = worker_factory("requeue", slow_model), worker_factory("requeue", slow_model)
    job = submit(client, model="requeue", prompt=LONG_PROMPT, max_tokens=5, temperature=0)
    running = wait_until(lambda: worker_running(r, job), what="the job's worker", interval=0.01)
    assert not [e for e in events(client, job, until="started") if e["type"] == "token"]
    (a if running.pid == a.proc.pid else b).proc.send_signal(signal.SIGKILL)
    evts = events(client, job)
    types = [e["type"] for e in evts]
    assert types[-1] == "end" and types.count("started") == 2 and types.count("queued") == 2
    assert any(e["type"] == "narration" and e["action"] == "requeue" for e in evts)
    assert evts[-1]["text"] == text_of(evts) and evts[-1]["tokens_out"] == 5
    assert [e["seq"] for e in evts] == list(range(len(evts)))
    starts = [e["worker"] for e in evts if e["type"] == "started"]
    assert starts[0] != starts[1]


def test_decoding_past_timeout_ends_with_timeout(client, slow_worker):
    job = submit(client, model="slow", prompt="go", max_tokens=3500, repetition_penalty=1.0, temperature=0, timeout_s=1)
    last = events(client, job)[-1]
    assert last["type"] == "error" and last["code"] == "TIMEOUT"
    assert client.get(f"/v1/jobs/{job}").get_json()["state"] == "failed"


def test_job_waiting_past_its_ttl_expires_with_a_clear_status(client, worker_factory, tiny_model):
    w = worker_factory("ttl", tiny_model)
    w.proc.send_signal(signal.SIGSTOP)
    try:
        submit(client, model="ttl", prompt="blocker", max_tokens=2)
        job = submit(client, model="ttl", prompt="late", max_tokens=2, ttl_s=1)
        time.sleep(1.3)
        assert client.get(f"/v1/jobs/{job}").get_json()["state"] == "expired"
    finally:
        w.proc.send_signal(signal.SIGCONT)
    last = events(client, job)[-1]
    assert last["type"] == "error" and last["code"] == "TIMEOUT" and "ttl_s" in last["message"]


@pytest.mark.parametrize("make,needle", [
    (lambda p: make_llama_gguf(p, arch="mysterynet"), "could not load"),
    (lambda p: p.write_bytes(make_llama_gguf(p).read_bytes()[:40_000]), "truncated"),
    (lambda p: p.write_bytes(b"GGUF" + b"\x00" * 20), "GGUF"),
])
def test_bad_model_files_stop_the_worker_with_one_line(tmp_path, redis_url, make, needle):
    path = tmp_path / "bad.gguf"
    make(path)
    proc = subprocess.run([sys.executable, "-m", "inferq", "worker", "--model", f"bad={path}", "--redis-url",
                           redis_url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1  # an error, not a segfault (-11)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@contextmanager
def own_redis_with_worker(tmp_path, model: str, path):
    """A Redis of this test's own (with AOF, so it can be restarted), a worker and an API client on it."""
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    worker = start_worker(server.url, model, path, tmp_path)
    try:
        yield server, worker, create_app({"REDIS_URL": server.url, "TESTING": True}).test_client()
    finally:
        worker.stop(signal.SIGKILL)
        server.stop()


@pytest.mark.slow
def test_redis_restart_workers_and_api_recover(tmp_path, tiny_model):
    with own_redis_with_worker(tmp_path, "phoenix", tiny_model) as (server, worker, app):
        before = submit(app, model="phoenix", prompt="before", max_tokens=10, temperature=0)
        full = events(app, before)
        assert full[-1]["type"] == "end"
        server.stop()  # SIGTERM: redis writes its AOF and exits
        resp = app.post("/v1/jobs", json={"operation": "infer", "model": "phoenix", "prompt": "x"})
        assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "REDIS_UNAVAILABLE"
        assert app.get(f"/v1/jobs/{before}").status_code == 503
        time.sleep(1.5)
        server.start()
        client = redis.Redis.from_url(server.url)
        wait_until(lambda: any(w.model == "phoenix" and w.state == "idle" for w in registry.live_workers(client)),
                   timeout=30, what="the worker to come back")
        assert worker.proc.poll() is None, worker.log()
        # The log survived (AOF) and replays after a reconnect with Last-Event-ID.
        assert events(app, before, last_event_id=2) == full[3:]
        after = submit(app, model="phoenix", prompt="after", max_tokens=10, temperature=0)
        assert events(app, after)[-1]["type"] == "end"


@pytest.mark.slow
def test_redis_outage_mid_job_loses_no_events_and_leaves_the_worker_prompt(tmp_path, slow_model):
    with own_redis_with_worker(tmp_path, "outage", slow_model) as (server, worker, app):
        # The deadline ends the job 1 s in, whatever this machine's speed: inside the outage.
        job = submit(app, model="outage", prompt="go", max_tokens=4000, repetition_penalty=1.0, temperature=0,
                     timeout_s=1)
        assert events(app, job, until="token")[-1]["type"] == "token"
        server.stop()
        time.sleep(3)
        server.start()
        # Every event the worker made while Redis was away reached the log, in order.
        evts = events(app, job)
        assert [e["seq"] for e in evts] == list(range(len(evts)))
        assert evts[-1]["type"] == "error" and evts[-1]["code"] == "TIMEOUT", evts[-1]
        wait_until(lambda: app.get(f"/v1/jobs/{job}").get_json()["state"] == "failed", what="the job's state")
        # Idle past redis-py's default 5 s socket timeout: a worker blocking for jobs on a
        # connection with that timeout falls into RQ's back-off and leaves jobs waiting.
        time.sleep(12)
        t0 = time.monotonic()
        assert events(app, submit(app, model="outage", prompt="after", max_tokens=5))[-1]["type"] == "end"
        assert time.monotonic() - t0 < 3, worker.log()
        assert worker.proc.poll() is None, worker.log()
        assert "Timeout reading" not in worker.log(), worker.log()


@pytest.mark.parametrize("func", ["os.getpid", "tests.helpers.shut_redis_down_once"])
def test_workers_run_only_inferq_jobs(tmp_path, r, redis_url, tiny_worker, func):
    """Anything that can write to Redis could once run code in a worker by naming a function."""
    from rq.registry import FailedJobRegistry

    queue = Queue(keys.queue_name("tiny", "normal"), connection=r, serializer=JSONSerializer)
    marker = tmp_path / "ran"
    args = (redis_url, str(marker)) if func.startswith("tests.") else ()
    job = queue.enqueue(func, *args)
    wait_until(lambda: job.get_status(refresh=True) == JobStatus.FAILED, what="the worker to refuse the job")
    assert job.id in FailedJobRegistry(queue=queue).get_job_ids()
    assert "inferq's own jobs" in job.latest_result().exc_string and func in job.latest_result().exc_string
    assert r.ttl(job.key) > 0  # failed jobs expire like finished ones
    assert not marker.exists() and r.ping()
    last = __import__("queue_schema.lifecycle.eventlog", fromlist=["EventLog"]).EventLog(r).last(job.id)
    assert last.type == "error" and last.code == "INVALID_REQUEST"


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_api_sigterm_ends_open_streams_cleanly(redis_url, slow_worker, tiny_worker):
    """A stopping API process ends its SSE streams at once instead of holding them to its grace timeout."""
    import requests

    from inferq.client import Client

    api = start_api(redis_url, args=("--graceful-timeout", "30"))
    url = api.url
    try:
        job = Client(url).submit("long", model="slow", max_tokens=600, temperature=0)["job_id"]
        feed = requests.get(f"{url}/v1/narration", stream=True, timeout=30)
        stream = requests.get(f"{url}/v1/jobs/{job}/stream", stream=True, timeout=30)
        next(stream.iter_content(chunk_size=None))
        t0 = time.monotonic()
        api.send_signal(signal.SIGTERM)
        assert api.proc.wait(15) == 0
        assert time.monotonic() - t0 < 5  # not the 30 s grace timeout
        feed.close()
        stream.close()
    finally:
        api.kill()
    # The job itself was not touched by the API going away: it runs to its normal end.
    from queue_schema.lifecycle.eventlog import EventLog

    log = EventLog(redis.Redis.from_url(redis_url))
    last = wait_until(lambda: (lambda e: e if e is not None and e.terminal else None)(log.last(job)),
                      timeout=60, what="the job to end")
    assert last.type == "end" and last.stop_reason in ("max_tokens", "eos")

