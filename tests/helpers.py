"""Small helpers for talking to the API from tests (Flask test client or real HTTP)."""
from __future__ import annotations

import json
import os

import pytest
import redis
import requests

from inferq.client import chunk_lines, parse_sse


def submit(client, **fields) -> str:
    body = {"operation": "infer", **fields}
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.get_data(as_text=True)
    return resp.get_json()["job_id"]


def sse_frames(client, job_id: str, last_event_id: int | None = None, limit: int | None = None,
               until: str | None = None) -> list[dict]:
    """Raw SSE frames (event, id, data) of a job's stream; stops early after ``limit``
    frames, or after the first frame whose event type is ``until``."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    resp = client.get(f"/v1/jobs/{job_id}/stream", headers=headers, buffered=False)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.mimetype == "text/event-stream"
    frames = []
    try:
        for frame in parse_sse(chunk_lines(resp.response)):
            frames.append(frame)
            if (limit is not None and len(frames) >= limit) or frame.get("event") == until:
                break
    finally:
        resp.close()
    return frames


def events(client, job_id: str, last_event_id: int | None = None, limit: int | None = None,
           until: str | None = None) -> list[dict]:
    out = []
    for frame in sse_frames(client, job_id, last_event_id, limit, until):
        event = json.loads(frame["data"])
        assert frame["id"] == str(event["seq"]) and frame["event"] == event["type"]
        out.append(event)
    return out


def text_of(evts: list[dict]) -> str:
    return "".join(e["t"] for e in evts if e["type"] == "token")


def shut_redis_down_once(redis_url: str, marker: str) -> str:
    """An RQ job that takes Redis away just before its worker's post-job bookkeeping, the first time it runs."""
    if os.path.exists(marker):
        return "second run"
    open(marker, "w").close()
    redis.Redis.from_url(redis_url).shutdown()
    return "first run"


def serve_fake_model(client: redis.Redis, model: str, queue_depth: int = 1000, slots: int = 1,
                     capabilities: tuple[str, ...] = ()) -> None:
    """A model that admission takes jobs for, with no worker that would run them: a heartbeat only
    (good for 10 s; call again to keep it). Jobs stay queued until a test takes them."""
    from queue_schema import records
    from queue_schema.lifecycle import registry

    worker = records.WorkerInfo(id=f"fake-{model}", host="test", pid=0, model=model, backend="none", state="idle",
                                 slots=slots)
    registry.publish_heartbeat(client, worker, records.ModelInfo(name=model, context_length=512,
                                                                  queue_depth=queue_depth, backend="none",
                                                                  slots=slots, capabilities=list(capabilities)))


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (R, S, T stopped, Z zombie...), from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def stopped(pid: int) -> bool:
    """Whether a SIGSTOP has taken effect."""
    return process_state(pid) == "T"


def metric_samples(text: str) -> dict:
    """Prometheus text as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def skip_without_llama_cpp(why: str = "") -> None:
    """Skip the test (or fixture) when llama-cpp-python is absent: ``make test`` installs it."""
    from worker.backends.selection import installed

    if "llama-cpp" not in installed():
        pytest.skip(f"llama-cpp is not installed (make test installs it){why}")


def models_at(url: str) -> dict:
    """``GET /v1/models`` of a running API by model id; empty while it does not answer yet."""
    try:
        return {m["id"]: m for m in requests.get(url + "/v1/models", timeout=2).json()["data"]}
    except requests.RequestException:
        return {}
