"""Every bad-input class answers with its status and code, as JSON, never echoing the prompt."""
import json
import shutil
import signal

import pytest
import redis

from inferq.embedded_redis import free_port
from tests.conftest import wait_until
from tests.helpers import events, submit

SECRET = "SECRET-PROMPT-TEXT"


def body(**fields):
    return {"operation": "infer", "model": "tiny", "prompt": SECRET, **fields}


@pytest.mark.usefixtures("tiny_worker")
@pytest.mark.parametrize("raw,status,code", [
    (b"{not json", 400, "INVALID_JSON"),
    (json.dumps(body(max_tokens="many")).encode(), 422, "INVALID_REQUEST"),
    (json.dumps(body(temperature=9)).encode(), 422, "INVALID_REQUEST"),
    (json.dumps(body(extra_field=True)).encode(), 422, "INVALID_REQUEST"),
    (json.dumps({**body(), "operation": "train"}).encode(), 400, "UNSUPPORTED_OPERATION"),
    (json.dumps(body(model="no-such-model")).encode(), 404, "MODEL_NOT_FOUND"),
    (json.dumps(body(prompt=SECRET * 3000)).encode(), 422, "INVALID_REQUEST"),
])
def test_bad_submissions(client, raw, status, code):
    resp = client.post("/v1/jobs", data=raw, content_type="application/json")
    assert resp.status_code == status
    err = resp.get_json()["error"]
    assert err["code"] == code and err["message"]
    assert SECRET not in resp.get_data(as_text=True)
    if status == 422:
        assert err["errors"] and {"field", "constraint", "message"} <= set(err["errors"][0])


def test_unknown_job_route_and_method(client):
    assert client.get("/v1/jobs/nope").get_json()["error"]["code"] == "JOB_NOT_FOUND"
    assert client.get("/v1/jobs/nope/stream").status_code == 404
    assert client.delete("/v1/jobs/nope").status_code == 404
    resp = client.get("/no/such/route")
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "NOT_FOUND"
    resp = client.put("/v1/jobs")
    assert resp.status_code == 405 and resp.get_json()["error"]["code"] == "METHOD_NOT_ALLOWED"


@pytest.mark.usefixtures("tiny_worker")
def test_bad_last_event_id(client):
    job = submit(client, model="tiny", prompt="x", max_tokens=1)
    resp = client.get(f"/v1/jobs/{job}/stream", headers={"Last-Event-ID": "abc"})
    assert resp.status_code == 422


def test_oversized_body_is_413_json(client):
    resp = client.post("/v1/jobs", data=b"x" * (2 << 20), content_type="application/json")
    assert resp.status_code == 413 and resp.get_json()["error"]["code"] == "INVALID_REQUEST"


@pytest.mark.usefixtures("tiny_worker")
def test_deprecated_inference_alias(client):
    resp = client.post("/v1/inference", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert resp.status_code == 202
    assert resp.headers["Deprecation"] == "true" and "successor-version" in resp.headers["Link"]
    assert events(client, resp.get_json()["job_id"])[-1]["type"] == "end"


def test_full_queue_is_503_with_retry_after_and_loses_nothing(client, r, worker_factory, tiny_model):
    w = worker_factory("bounded", tiny_model, "--queue-depth", "2")
    w.proc.send_signal(signal.SIGSTOP)
    accepted = []
    try:
        # A stopped worker may or may not be inside BLPOP and swallow one job: submit until refused.
        for i in range(4):
            resp = client.post("/v1/jobs", json=body(model="bounded", prompt=f"j{i}", max_tokens=2))
            if resp.status_code != 202:
                break
            accepted.append(resp.get_json()["job_id"])
        assert resp.status_code == 503
        assert resp.get_json()["error"]["code"] == "QUEUE_FULL" and int(resp.headers["Retry-After"]) > 0
        assert 2 <= len(accepted) <= 3
        assert r.llen("rq:queue:inferq.bounded.normal") == 2
    finally:
        w.proc.send_signal(signal.SIGCONT)
    for job in accepted:  # the jobs already queued all finish
        assert events(client, job)[-1]["type"] == "end"


def test_redis_down_is_503_never_500():
    from api import create_app

    app = create_app({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "TESTING": True})
    c = app.test_client()
    for method, path, kw in [("post", "/v1/jobs", {"json": body()}), ("get", "/v1/jobs/abc", {}),
                             ("get", "/v1/jobs/abc/stream", {}), ("delete", "/v1/jobs/abc", {}),
                             ("get", "/v1/models", {}), ("get", "/v1/workers", {})]:
        resp = getattr(c, method)(path, **kw)
        assert resp.status_code == 503, (path, resp.get_data(as_text=True))
        assert resp.get_json()["error"]["code"] == "REDIS_UNAVAILABLE"
        assert "Traceback" not in resp.get_data(as_text=True)
    assert c.get("/ready").status_code == 503
    assert c.get("/health").status_code == 200


@pytest.mark.usefixtures("tiny_worker")
def test_ready_models_workers_and_openapi(client):
    ready = client.get("/ready")
    assert ready.status_code == 200 and "tiny" in ready.get_json()["models"]
    models = client.get("/v1/models").get_json()
    assert models["object"] == "list"
    tiny = next(m for m in models["data"] if m["id"] == "tiny")
    assert tiny["object"] == "model" and tiny["workers"] >= 1 and tiny["context_length"] == 512
    workers = client.get("/v1/workers").get_json()["workers"]
    w = next(w for w in workers if w["model"] == "tiny")
    assert w["backend"] in ("ctransformers", "llama-cpp") and w["backend_reason"]
    assert w["state"] in ("idle", "busy") and w["pid"] > 0
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    assert "/v1/jobs" in doc["paths"] and "InferOperation" in doc["components"]["schemas"]
    assert doc["components"]["schemas"]["InferOperation"]["properties"]["max_tokens"]["maximum"] == 4096


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


JSON_ROUTES = [("/v1/jobs", "inferq"), ("/v1/inference", "inferq"), ("/v1/completions", "openai"),
               ("/v1/chat/completions", "openai")]


def route_body(path: str, **extra) -> dict:
    if path == "/v1/completions":
        return {"model": "tiny", "prompt": SECRET, **extra}
    if path == "/v1/chat/completions":
        return {"model": "tiny", "messages": [{"role": "user", "content": SECRET}], **extra}
    return {**body(), **extra}


def assert_refused(resp, shape: str, statuses=(400, 422)):
    assert resp.status_code in statuses, resp.get_data(as_text=True)[:300]
    err = resp.get_json()["error"]
    keys = {"code", "message"} if shape == "inferq" else {"code", "message", "type", "param"}
    assert keys <= set(err) and err["message"]
    assert SECRET not in resp.get_data(as_text=True)
    return err


@pytest.mark.parametrize("path,shape", JSON_ROUTES)
def test_deeply_nested_json_is_a_4xx_never_a_500(client, path, shape):
    # 100k levels: json's decoder gives up with RecursionError.
    err = assert_refused(client.post(path, data=nested(100_000), content_type="application/json"), shape)
    assert err["code"] in ("INVALID_JSON", "invalid_json")
    inner = json.dumps(route_body(path, metadata={"deep": "PLACEHOLDER"})).replace('"PLACEHOLDER"', nested(50_000))
    assert_refused(client.post(path, data=inner, content_type="application/json"), shape)
    # 256 levels decode fine; the schema refuses nested metadata values.
    deep = json.dumps(route_body(path, metadata={"deep": json.loads(nested(256))}))
    err = assert_refused(client.post(path, data=deep, content_type="application/json"), shape)
    assert "metadata" in (err.get("param") or err["message"])


def test_a_chat_content_part_must_have_text_as_a_string(client):
    for text in (7, 1.5, ["a"], {"a": 1}):
        msg = {"role": "user", "content": [{"type": "text", "text": text}]}
        resp = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [msg]})
        err = assert_refused(resp, "openai", statuses=(400,))
        assert err["param"].startswith("messages.0.content")
    # Non-text parts are still ignored.
    ok = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "hi"}]}
    resp = client.post("/v1/chat/completions", json={"model": "no-such-model", "messages": [ok]})
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "model_not_found"


def test_huge_or_odd_last_event_ids_are_422(client, r):
    from queue_schema.events import End, Queued
    from queue_schema.lifecycle.eventlog import EventLog

    job = f"lei-{free_port()}"
    EventLog(r).append_many([Queued(job_id=job, seq=0, position=0, queue="inferq.lei.normal"),
                             End(job_id=job, seq=1, tokens_out=0, decode_time_ms=0, stop_reason="eos", text="")])
    for value in ("1000000000000000000000000000000", str(2**53 + 1), "-2", "1" * 5000, "1e3", "0x10"):
        for kw in ({"headers": {"Last-Event-ID": value}}, {"query_string": {"last_event_id": value}}):
            resp = client.get(f"/v1/jobs/{job}/stream", **kw)
            assert resp.status_code == 422 and resp.get_json()["error"]["code"] == "INVALID_REQUEST", (value, kw)
    # The largest allowed: past the log's end (a client that saw events a failed-over Redis lost),
    # so the stream sends the restart marker once (read again from the start), and closes.
    resp = client.get(f"/v1/jobs/{job}/stream", headers={"Last-Event-ID": str(2**53)}, buffered=True)
    body = resp.get_data(as_text=True)
    assert resp.status_code == 200 and body.count("event:") == 1 and "event: restart" in body


def _copy_of(server, tmp):
    """A redis-server of the test's own, in sync as a replica of ``server`` (the session's)."""
    from inferq.embedded_redis import EmbeddedRedis

    copy = EmbeddedRedis(tmp / "copy", appendonly=False).start()
    c = redis.Redis(port=copy.port, password=copy.password)
    c.config_set("masterauth", server.password)
    c.execute_command("REPLICAOF", "127.0.0.1", server.port)
    wait_until(lambda: c.info("replication").get("master_link_status") == "up", what="the copy to sync")
    return copy, c


def _read_only(c, copy):
    pass  # a replica: every write is refused with READONLY, as on a demoted master in a failover


def _full(c, copy):
    c.execute_command("REPLICAOF", "NO", "ONE")
    c.config_set("maxmemory", 1)  # noeviction (the default): writes are refused with OOM


def _failing_to_persist(c, copy):
    c.execute_command("REPLICAOF", "NO", "ONE")
    c.config_set("save", "3600 1")
    shutil.rmtree(copy.data_dir)  # the snapshot cannot be written: writes are refused with MISCONF
    c.bgsave()
    wait_until(lambda: c.info("persistence")["rdb_last_bgsave_status"] == "err", what="the snapshot to fail")


def _cut_off(c, copy):
    c.config_set("replica-serve-stale-data", "no")  # every command is refused with MASTERDOWN
    c.execute_command("REPLICAOF", "127.0.0.1", free_port())


@pytest.mark.usefixtures("tiny_worker")
@pytest.mark.parametrize("make", [_read_only, _full, _failing_to_persist, _cut_off])
def test_a_redis_that_cannot_take_writes_is_503_with_retry_after_never_500(redis_server, tmp_path, make):
    """The answers a failover (READONLY, MASTERDOWN) or a full or failing Redis (OOM, MISCONF) gives,
    from real servers: Redis 6 wraps them in a script error, and nearly every write is a script."""
    from api import create_app

    copy, c = _copy_of(redis_server, tmp_path)
    try:
        make(c, copy)
        # No headroom: Redis's own refusals are what is tested here (tests/test_quotas.py tests the headroom).
        app = create_app({"REDIS_URL": copy.url, "TESTING": True, "REDIS_HEADROOM": 0}).test_client()
        for path, payload, code in [("/v1/jobs", body(max_tokens=2), "REDIS_UNAVAILABLE"),
                                    ("/v1/completions", {"model": "tiny", "prompt": SECRET, "max_tokens": 2},
                                     "redis_unavailable")]:
            resp = app.post(path, json=payload)
            assert resp.status_code == 503, (path, resp.get_data(as_text=True)[:300])
            assert resp.get_json()["error"]["code"] == code and int(resp.headers["Retry-After"]) > 0
            assert "Traceback" not in resp.get_data(as_text=True)
    finally:
        copy.stop()
