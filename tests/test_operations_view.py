"""What operators watch: /metrics, /rq, /v1/workers, the narration feed, logs."""
import base64
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from api import create_app
from inferq.client import Client
from tests.conftest import ROOT, wait_until
from tests.helpers import events, metric_samples, submit


def scrape(client) -> dict:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype.startswith("text/plain")
    return metric_samples(resp.get_data(as_text=True))


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def test_metrics_count_the_jobs_that_ran(client, worker_factory, tiny_model, slow_model):
    worker_factory("metered", tiny_model)
    before = scrape(client)
    done = [submit(client, model="metered", prompt=f"m{i}", max_tokens=5, temperature=0) for i in range(3)]
    bad = submit(client, model="metered", prompt="word " * 600, max_tokens=16)  # context overflow
    for job in done + [bad]:
        events(client, job)

    tokens = sum(events(client, j)[-1]["tokens_out"] for j in done)

    def counted():
        # A job's outcome is counted by its settle, its tokens and times a moment later by the worker.
        samples = scrape(client)
        moved = sum(value(samples, f"inferq_jobs_{k}_total", model="metered") -
                    value(before, f"inferq_jobs_{k}_total", model="metered") for k in ("finished", "failed"))
        generated = value(samples, "inferq_tokens_generated_total", model="metered") - \
            value(before, "inferq_tokens_generated_total", model="metered")
        return samples if moved == 4 and generated >= tokens else None

    after = wait_until(counted, timeout=20, what="all four jobs in /metrics")
    assert value(after, "inferq_jobs_submitted_total", model="metered") - \
        value(before, "inferq_jobs_submitted_total", model="metered") == 4
    assert value(after, "inferq_jobs_finished_total", model="metered") - \
        value(before, "inferq_jobs_finished_total", model="metered") == 3
    assert value(after, "inferq_jobs_failed_total", model="metered") - \
        value(before, "inferq_jobs_failed_total", model="metered") == 1
    assert value(after, "inferq_tokens_generated_total", model="metered") - \
        value(before, "inferq_tokens_generated_total", model="metered") == tokens
    assert value(after, "inferq_ttft_seconds_count", model="metered") >= 3
    assert value(after, "inferq_queue_wait_seconds_count", model="metered") >= 3
    # Idle, or still busy for the few ms RQ takes to file the last job.
    assert value(after, "inferq_workers", model="metered", state="idle") + \
        value(after, "inferq_workers", model="metered", state="busy") >= 1
    assert value(after, "inferq_queue_depth", model="metered", priority="normal") == 0
    assert any(k[0] == "inferq_worker_tokens_per_second" and ("model", "metered") in k[1] for k in after)


def test_metrics_see_a_waiting_queue(client, worker_factory, tiny_model):
    import signal

    w = worker_factory("backlog", tiny_model)
    w.proc.send_signal(signal.SIGSTOP)
    try:
        jobs = [submit(client, model="backlog", prompt=f"b{i}", max_tokens=2) for i in range(3)]
        time.sleep(1.1)
        samples = scrape(client)
        assert value(samples, "inferq_queue_depth", model="backlog", priority="normal") >= 2
        assert value(samples, "inferq_queue_oldest_job_age_seconds", model="backlog", priority="normal") >= 1
    finally:
        w.proc.send_signal(signal.SIGCONT)
    for job in jobs:
        assert events(client, job)[-1]["type"] == "end"


def test_cancelled_queued_jobs_are_counted(client, worker_factory, tiny_model):
    import signal

    w = worker_factory("cancelcount", tiny_model)
    w.proc.send_signal(signal.SIGSTOP)
    try:
        submit(client, model="cancelcount", prompt="blocker", max_tokens=2)
        time.sleep(0.3)
        job = submit(client, model="cancelcount", prompt="x", max_tokens=2)
        before = value(scrape(client), "inferq_jobs_cancelled_total", model="cancelcount")
        assert client.delete(f"/v1/jobs/{job}").status_code in (200, 202)
    finally:
        w.proc.send_signal(signal.SIGCONT)
    events(client, job)
    wait_until(lambda: value(scrape(client), "inferq_jobs_cancelled_total", model="cancelcount") == before + 1,
               timeout=5, what="the cancel in /metrics")


def test_dashboard_is_behind_auth(redis_url):
    app = create_app({"REDIS_URL": redis_url, "API_TOKENS": "s3cret", "TESTING": True}).test_client()
    resp = app.get("/rq/")
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
    basic = base64.b64encode(b"admin:s3cret").decode()
    assert app.get("/rq/", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert app.get("/rq/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    wrong = base64.b64encode(b"admin:nope").decode()
    assert app.get("/rq/", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    assert app.get("/metrics").status_code == 200  # scrapers need no token


@pytest.mark.usefixtures("tiny_worker")
def test_dashboard_lists_inferq_queues(client):
    submit(client, model="tiny", prompt="for the dashboard", max_tokens=2)
    resp = client.get("/rq/0/data/queues.json")
    assert resp.status_code == 200
    names = [q["name"] for q in resp.get_json()["queues"]]
    assert "inferq.tiny.normal" in names


def test_workers_view_shows_a_busy_worker(client, slow_worker):
    job = submit(client, model="slow", prompt="busy", max_tokens=2000, temperature=0)
    events(client, job, until="token")
    workers = client.get("/v1/workers").get_json()["workers"]
    busy = [w for w in workers if w["current_job"] == job]
    assert busy and busy[0]["state"] == "busy" and busy[0]["model"] == "slow"
    assert {"id", "host", "backend", "device", "vram_bytes", "heartbeat_at", "last_tokens_per_sec"} <= set(busy[0])
    assert time.time() - busy[0]["heartbeat_at"] < 10
    client.delete(f"/v1/jobs/{job}")
    events(client, job)
    wait_until(lambda: any(w["id"] == busy[0]["id"] and w["state"] == "idle"
                           for w in client.get("/v1/workers").get_json()["workers"]), what="the worker to go idle")


def test_narration_feed_tells_load_start_and_end(live_api, worker_factory, tiny_model):
    api = Client(live_api)
    seen = []

    def follow():
        for event in api.narration(follow=True, backlog=0):
            seen.append(event)
            if event.get("action") == "finish" and event.get("target") == state.get("job"):
                return

    state = {}
    t = threading.Thread(target=follow, daemon=True)
    t.start()
    time.sleep(0.5)
    worker_factory("storyteller", tiny_model)
    state["job"] = api.submit("tell me", model="storyteller", max_tokens=4)["job_id"]
    t.join(30)
    actions = [(e["action"], e["target"]) for e in seen]
    assert ("load", "storyteller") in actions
    assert ("start", state["job"]) in actions and ("finish", state["job"]) in actions
    recent = list(api.narration(follow=False, backlog=50))
    assert any(e.get("target") == state["job"] for e in recent)


def test_cli_logs_prints_the_feed(live_api, tiny_worker):
    job = Client(live_api).submit("log me", model="tiny", max_tokens=3)["job_id"]
    list(Client(live_api).events(job))
    out = subprocess.run([sys.executable, "-m", "inferq", "--api-url", live_api, "logs", "--backlog", "50"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and f"job {job[:8]}" in out.stdout and "Generated 3 tokens" in out.stdout


def test_json_logs_carry_job_and_worker_and_never_the_prompt(tmp_path, redis_url, tiny_model, client):
    log_path = tmp_path / "w.log"
    env = {**os.environ, "INFERQ_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "inferq", "worker", "--model", f"jsonlog={tiny_model}",
                             "--threads", "1", "--redis-url", redis_url], cwd=ROOT, env=env,
                            stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: client.get("/v1/models").get_json() and any(
            m["id"] == "jsonlog" and m["workers"] for m in client.get("/v1/models").get_json()["data"]),
            what="the json-logging worker")
        job = submit(client, model="jsonlog", prompt="TOP-SECRET-PROMPT", max_tokens=3)
        events(client, job)
        time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(30)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg", "job_id", "worker"} <= set(line) for line in lines)
    job_lines = [line for line in lines if line["job_id"] == job]
    assert job_lines and all(line["worker"] for line in job_lines)
    assert "TOP-SECRET-PROMPT" not in log_path.read_text()


@pytest.mark.usefixtures("tiny_worker")
def test_queued_job_reports_an_eta_once_throughput_is_known(client, r, worker_factory, tiny_model):
    import signal

    for _ in range(2):  # some history for the moving average
        events(client, submit(client, model="tiny", prompt="warm", max_tokens=3))
    w = worker_factory("eta", tiny_model)
    events(client, submit(client, model="eta", prompt="warm", max_tokens=3))
    from queue_schema.lifecycle import stats

    wait_until(lambda: stats.job_seconds(r, "eta") is not None, what="the worker to file its job time")
    w.proc.send_signal(signal.SIGSTOP)
    try:
        submit(client, model="eta", prompt="blocker", max_tokens=2)
        time.sleep(0.3)
        job = submit(client, model="eta", prompt="waiting", max_tokens=2)
        status = client.get(f"/v1/jobs/{job}").get_json()
        assert status["state"] == "queued" and status["eta_s"] is not None and status["eta_s"] > 0
        assert events(client, job, limit=1)[0]["eta_s"] > 0
    finally:
        w.proc.send_signal(signal.SIGCONT)


def test_job_time_average_is_updated_atomically_by_concurrent_workers(r):
    """The ETA's moving average: each update weighs 0.2, and updates racing from many
    workers are all applied (a read-then-write from Python would lose some)."""
    from queue_schema.lifecycle import stats

    model = f"ewma-{os.getpid()}-{time.monotonic_ns()}"
    stats.update_job_seconds(r, model, 10.0)
    stats.update_job_seconds(r, model, 20.0)
    assert stats.job_seconds(r, model) == pytest.approx(0.8 * 10 + 0.2 * 20)
    # 8 threads x 50 updates from 0 towards 1 with a small weight: the result counts the
    # updates applied (after n of them it is 1 - 0.999**n), so a lost one shows.
    model2 = model + "-race"
    stats.update_job_seconds(r, model2, 0.0)

    def update_50():
        for _ in range(50):
            stats.update_job_seconds(r, model2, 1.0, weight=0.001)

    threads = [threading.Thread(target=update_50) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.job_seconds(r, model2) == pytest.approx(1 - 0.999 ** 400, rel=1e-9)


def test_models_say_online_or_offline_and_are_dropped_after_the_grace(client, r, worker_factory, tiny_model):
    from queue_schema import keys, records
    from queue_schema.lifecycle import registry

    def listed():
        return {m["id"]: m for m in client.get("/v1/models").get_json()["data"]}

    w = worker_factory("leaving", tiny_model)
    m = listed()["leaving"]
    assert m["status"] == "online" and m["serving_workers"] == 1 and time.time() - m["last_seen"] < 10
    assert w.stop() == 0  # a clean exit takes the worker off the registry at once
    m = listed()["leaving"]
    assert m["status"] == "offline" and m["workers"] == 0 and m["serving_workers"] == 0
    assert 0 <= time.time() - m["last_seen"] < 10

    # Past the grace a model is gone; just inside it, it is still listed (offline). The records are
    # what a worker's heartbeat writes, backdated.
    now = time.time()
    for name, age in (("long-gone", registry.MODEL_TTL_S + 5), ("just-gone", registry.MODEL_TTL_S - 30)):
        info = records.ModelInfo(name=name, context_length=512, queue_depth=10, backend="llama-cpp",
                                  last_seen=now - age)
        r.set(keys.model(name), info.model_dump_json(), ex=registry.MODEL_TTL_S)
        r.zadd(keys.MODELS, {name: now - age})
    models = listed()
    assert "long-gone" not in models and r.zscore(keys.MODELS, "long-gone") is None
    assert models["just-gone"]["status"] == "offline"
    assert models["just-gone"]["last_seen"] == pytest.approx(now - registry.MODEL_TTL_S + 30)


def test_a_submit_to_a_model_whose_workers_all_left_is_told_it_is_offline(client, worker_factory, tiny_model):
    w = worker_factory("gone-offline", tiny_model)
    assert events(client, submit(client, model="gone-offline", prompt="x", max_tokens=2))[-1]["type"] == "end"
    assert w.stop() == 0
    resp = client.post("/v1/jobs", json={"operation": "infer", "model": "gone-offline", "prompt": "x"})
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "MODEL_OFFLINE"
    assert resp.headers["Retry-After"] == "5"
