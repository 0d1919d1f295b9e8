"""OpenAI Files and Batches, driven by the official openai client against real API processes and workers."""
import io
import json
import signal
import time
import uuid

import openai
import pytest
import requests

from api import create_app
from queue_schema import keys
from tests.conftest import TenantAPI, start_api, start_worker, wait_until
from tests.helpers import bearer, serve_fake_model
from tests.test_webhooks import Receiver, verify


def client_for(api_url: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key=token, max_retries=0, timeout=30)


def jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def chat_line(custom_id, model="tiny", content="hi", **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 3,
                     "temperature": 0, **body}}


def wait_status(oai, batch_id, statuses, timeout=30.0):
    return wait_until(lambda: (lambda b: b if b.status in statuses else None)(oai.batches.retrieve(batch_id)),
                      timeout=timeout, interval=0.2, what=f"batch {batch_id} to be {statuses}")


def lines_of(oai, file_id) -> dict:
    return {row["custom_id"]: row for row in map(json.loads, oai.files.content(file_id).text.splitlines())}


@pytest.mark.usefixtures("tiny_worker")
def test_a_batch_of_good_and_bad_lines_end_to_end(tenant_api, r):
    oai = client_for(tenant_api.url, tenant_api.ALICE)
    hook = Receiver({"/batch": [200]})
    rows = [chat_line(f"good-{i}", content=f"line {i}") for i in range(6)]
    rows += [chat_line("bad-temperature", temperature=5), chat_line("bad-model", model="no-such-model"),
             chat_line("too-long", content="word " * 600, max_tokens=16)]
    uploaded = oai.files.create(file=("requests.jsonl", jsonl(rows)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(rows)) and uploaded.filename == "requests.jsonl"
    assert oai.files.retrieve(uploaded.id).id == uploaded.id
    try:
        batch = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                   completion_window="24h", metadata={"run": "e2e"},
                                   extra_body={"webhook_url": hook.url + "/batch"})
        assert batch.status == "validating" and batch.metadata == {"run": "e2e"}
        done = wait_status(oai, batch.id, {"completed", "failed"})
        assert done.status == "completed", done
        assert done.request_counts.total == 9 and done.request_counts.completed == 6
        assert done.request_counts.failed == 3
        assert done.in_progress_at and done.finalizing_at and done.completed_at >= done.created_at
        out = lines_of(oai, done.output_file_id)
        assert sorted(out) == [f"good-{i}" for i in range(6)]
        for custom_id, row in out.items():
            resp = row["response"]
            assert resp["status_code"] == 200 and row["error"] is None
            assert resp["body"]["object"] == "chat.completion" and resp["body"]["usage"]["completion_tokens"] == 3
            job = r.hgetall(keys.rq_job(resp["request_id"]))
            assert json.loads(job[b"meta"])["priority"] == "batch"  # below low: interactive goes first
        errors = lines_of(oai, done.error_file_id)
        assert {k: v["response"]["status_code"] for k, v in errors.items()} == {
            "bad-temperature": 400, "bad-model": 404, "too-long": 400}
        assert errors["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
        assert errors["bad-model"]["response"]["body"]["error"]["code"] == "model_not_found"
        assert errors["bad-temperature"]["response"]["body"]["error"]["param"] == "temperature"
        # The batch's webhook, signed like a job's.
        wait_until(lambda: hook.seen, timeout=10, what="batch.completed")
        _, headers, body = hook.seen[0]
        assert verify(TenantAPI.WEBHOOK_SECRET, headers, body)
        event = json.loads(body)
        assert event["type"] == "batch.completed" and event["data"]["id"] == batch.id
        assert event["data"]["request_counts"] == {"total": 9, "completed": 6, "failed": 3}
        # Lists, newest first; another tenant sees none of it.
        assert oai.batches.list(limit=1).data[0].id == batch.id
        bob = client_for(tenant_api.url, tenant_api.BOB)
        for call in (lambda: bob.batches.retrieve(batch.id), lambda: bob.files.content(done.output_file_id),
                     lambda: bob.batches.cancel(batch.id), lambda: bob.files.delete(uploaded.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        assert batch.id not in [b.id for b in bob.batches.list().data]
        # Working state is gone once the batch is done; the record stays.
        assert not r.exists(keys.batch_lines(batch.id), keys.batch_results(batch.id), keys.batch_jobs(batch.id))
        with pytest.raises(openai.ConflictError):
            oai.batches.cancel(batch.id)
    finally:
        hook.close()
    assert oai.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(uploaded.id)


@pytest.mark.usefixtures("tiny_worker")
def test_a_batch_of_embeddings_is_answered_as_the_route_answers(tenant_api, r):
    import base64

    import numpy as np

    oai = client_for(tenant_api.url, tenant_api.ALICE)
    texts = ["the data model", "import queue"]

    def line(custom_id, **body):
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"model": "tiny", **body}}

    rows = [line("floats", input=texts), line("base64", input=texts[0], encoding_format="base64"),
            line("ids", input=[[1, 2, 3]]), line("dimensions", input="x", dimensions=8),
            line("no-model", input="x", model="no-such-model")]
    f = oai.files.create(file=("embed.jsonl", jsonl(rows)), purpose="batch")
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    done = wait_status(oai, batch.id, {"completed", "failed"})
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 3, 2)
    out = lines_of(oai, done.output_file_id)
    direct = oai.embeddings.create(model="tiny", input=texts)
    floats = out["floats"]["response"]["body"]
    assert floats["object"] == "list" and [d["index"] for d in floats["data"]] == [0, 1]
    assert floats["usage"]["prompt_tokens"] == direct.usage.prompt_tokens
    for mine, theirs in zip(floats["data"], direct.data):
        assert np.allclose(mine["embedding"], theirs.embedding, atol=1e-4)
    packed = out["base64"]["response"]["body"]["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(packed), dtype="<f4"), direct.data[0].embedding, atol=1e-4)
    assert len(out["ids"]["response"]["body"]["data"]) == 1
    job = r.hgetall(keys.rq_job(out["floats"]["response"]["request_id"]))
    assert json.loads(job[b"meta"])["priority"] == "batch"
    errors = lines_of(oai, done.error_file_id)
    assert errors["dimensions"]["response"]["status_code"] == 400
    assert errors["dimensions"]["response"]["body"]["error"]["param"] == "dimensions"
    assert errors["no-model"]["response"]["body"]["error"]["code"] == "model_not_found"


@pytest.mark.usefixtures("tiny_worker")
def test_chat_lines_keep_logprobs_and_take_one_choice(tenant_api):
    oai = client_for(tenant_api.url, tenant_api.ALICE)
    rows = [chat_line("logprobs", logprobs=True, top_logprobs=2), chat_line("two", n=2)]
    f = oai.files.create(file=("lp.jsonl", jsonl(rows)), purpose="batch")
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_status(oai, batch.id, {"completed", "failed"})
    assert done.status == "completed", done
    body = lines_of(oai, done.output_file_id)["logprobs"]["response"]["body"]
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 3
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
    direct = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                         temperature=0, logprobs=True, top_logprobs=2)
    assert [t["token"] for t in content] == [e.token for e in direct.choices[0].logprobs.content]
    assert [t["logprob"] for t in content] == pytest.approx([e.logprob for e in direct.choices[0].logprobs.content],
                                                            abs=1e-3)
    two = lines_of(oai, done.error_file_id)["two"]["response"]
    assert two["status_code"] == 400 and two["body"]["error"]["param"] == "n"


def test_a_file_that_breaks_the_format_fails_the_batch_with_line_numbers(tenant_api):
    oai = client_for(tenant_api.url, tenant_api.ALICE)
    data = jsonl([chat_line("a"), chat_line("a"), {"custom_id": "b", "method": "GET", "url": "/v1/chat/completions",
                                                   "body": {}}]) + b"{not json\n"
    f = oai.files.create(file=("bad.jsonl", data), purpose="batch")
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = wait_status(oai, batch.id, {"failed", "completed"})
    assert failed.status == "failed" and failed.failed_at
    assert [(e.code, e.line) for e in failed.errors.data] == [
        ("duplicate_custom_id", 2), ("invalid_method", 3), ("invalid_json_line", 4)]
    binary = oai.files.create(file=("bin.jsonl", b"\xff\xfe\n"), purpose="batch")
    not_text = oai.batches.create(input_file_id=binary.id, endpoint="/v1/completions", completion_window="24h")
    assert [e.code for e in wait_status(oai, not_text.id, {"failed"}).errors.data] == ["invalid_file"]
    with pytest.raises(openai.BadRequestError):  # an endpoint inferq's batches do not serve
        oai.batches.create(input_file_id=f.id, endpoint="/v1/responses", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        oai.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")


@pytest.mark.usefixtures("tiny_worker")
def test_line_separators_inside_json_strings_do_not_split_a_line(tenant_api):
    """U+2028, U+2029 and U+0085 are legal raw inside JSON strings: the file is split where the upload counted
    its lines (\\n, \\r\\n), never there (str.splitlines cut such a line in two and failed the batch)."""
    oai = client_for(tenant_api.url, tenant_api.ALICE)
    row = {"custom_id": "sep", "method": "POST", "url": "/v1/completions",
           "body": {"model": "tiny", "prompt": "a\u2028b\u2029c\u0085d", "max_tokens": 2}}
    data = (json.dumps(row, ensure_ascii=False) + "\r\n").encode()
    assert "\u2028".encode() in data
    f = oai.files.create(file=("seps.jsonl", data), purpose="batch")
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    done = wait_status(oai, batch.id, {"failed", "completed"})
    assert done.status == "completed" and done.request_counts.completed == 1, done.errors


def test_a_cancelled_batch_stops_its_jobs_and_reports_what_ran(tenant_api, slow_worker):
    oai = client_for(tenant_api.url, tenant_api.ALICE)
    rows = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "slow", "prompt": "go on", "max_tokens": 3000, "temperature": 0}} for i in range(8)]
    f = oai.files.create(file=("long.jsonl", jsonl(rows)), purpose="batch")
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    wait_status(oai, batch.id, {"in_progress"})

    def running():
        listed = requests.get(f"{tenant_api.url}/v1/jobs", params={"model": "slow", "state": "running"},
                              headers=bearer(tenant_api.ALICE), timeout=10).json()["data"]
        return [j for j in listed if j["started_ms"] and j["submitted_ms"] >= batch.created_at * 1000]

    wait_until(running, timeout=15, what="a line to start")
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    done = wait_status(oai, batch.id, {"cancelled"}, timeout=30)
    counts = done.request_counts
    assert counts.total == 8 and counts.completed == 0 and counts.failed == 4  # the window: 4 at once
    errors = lines_of(oai, done.error_file_id)
    assert {row["error"]["code"] for row in errors.values()} == {"batch_cancelled"} and len(errors) == counts.failed
    assert done.output_file_id is None and done.cancelled_at >= done.cancelling_at


def test_a_batch_past_its_window_expires_with_the_rest_in_the_error_file(tenant_api, r):
    model = "idle-" + uuid.uuid4().hex[:6]
    serve_fake_model(r, model)  # jobs wait: nobody runs them
    oai = client_for(tenant_api.url, tenant_api.ALICE)
    f = oai.files.create(file=("x.jsonl", jsonl([chat_line(f"e{i}", model=model) for i in range(6)])),
                         purpose="batch")
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.expires_at == batch.created_at + 24 * 3600
    wait_until(lambda: oai.batches.retrieve(batch.id).status == "in_progress" and
               r.hlen(keys.batch_jobs(batch.id)) == 2 * 4, what="the window's lines queued")
    r.hset(keys.batch(batch.id), "expires_at", int(time.time()) - 1)  # as if 24 h had passed
    done = wait_status(oai, batch.id, {"expired"})
    assert done.expired_at and done.request_counts.failed == 6 and done.request_counts.completed == 0
    errors = lines_of(oai, done.error_file_id)
    assert sorted(errors) == [f"e{i}" for i in range(6)]
    assert {row["error"]["code"] for row in errors.values()} == {"batch_expired"}
    # Its queued jobs were cancelled, not left for a worker.
    job = r.hget(keys.batch_jobs(batch.id), "0")
    assert job is None  # working state dropped
    listed = requests.get(f"{tenant_api.url}/v1/jobs", params={"model": model}, headers=bearer(tenant_api.ALICE),
                          timeout=10).json()["data"]
    assert {j["state"] for j in listed} == {"cancelled"} and len(listed) == 4


def test_file_limits_are_clear_errors(redis_url):
    tag = uuid.uuid4().hex[:6]
    app = create_app({"REDIS_URL": redis_url, "TESTING": True, "API_TOKENS": f"carol-{tag}:tok-carol-{tag}-0123456",
                      "FILE_MAX_BYTES": 2000, "FILE_MAX_LINES": 3, "FILES_MAX_BYTES_PER_TENANT": 3000})
    client = app.test_client()
    auth = bearer(f"tok-carol-{tag}-0123456")

    def upload(content: bytes, purpose="batch"):
        return client.post("/v1/files", headers=auth, content_type="multipart/form-data",
                           data={"purpose": purpose, "file": (io.BytesIO(content), "in.jsonl")})

    ok = upload(jsonl([chat_line("a")]))
    assert ok.status_code == 200 and ok.get_json()["object"] == "file"
    checks = [(upload(b"x" * 2001), 413, "file_too_large"), (upload(jsonl([chat_line(str(i)) for i in range(4)])),
                                                             400, "too_many_lines"),
              (upload(b"{}", purpose="fine-tune"), 400, "invalid_value")]
    for resp, status, code in checks:
        assert resp.status_code == status and resp.get_json()["error"]["code"] == code, resp.get_json()
        assert resp.get_json()["error"]["type"] == "invalid_request_error"
    big = upload(b"y" * 1900)
    assert big.status_code == 200
    over = upload(b"z" * 1900)  # the tenant's files would pass 3,000 bytes
    assert over.status_code == 413 and "delete some" in over.get_json()["error"]["message"]
    client.delete(f"/v1/files/{big.get_json()['id']}", headers=auth)
    assert upload(b"z" * 1900).status_code == 200
    not_multipart = client.post("/v1/files", headers=auth, json={"purpose": "batch"})
    assert not_multipart.status_code == 415


def test_files_list_newest_first_in_pages_with_a_cursor(redis_url):
    """GET /v1/files pages like OpenAI's (limit, after, has_more); files uploaded in the same millisecond are
    all listed; another tenant's files are not."""
    tag = uuid.uuid4().hex[:6]
    app = create_app({"REDIS_URL": redis_url, "TESTING": True,
                      "API_TOKENS": f"dora-{tag}:tok-dora-{tag}-0123456,eve-{tag}:tok-eve-{tag}-0123456"})
    client = app.test_client()
    dora, eve = bearer(f"tok-dora-{tag}-0123456"), bearer(f"tok-eve-{tag}-0123456")

    def upload(auth, name):
        resp = client.post("/v1/files", headers=auth, content_type="multipart/form-data",
                           data={"purpose": "batch", "file": (io.BytesIO(b"{}\n"), name)})
        assert resp.status_code == 200
        return resp.get_json()["id"]

    mine = [upload(dora, f"f{i}.jsonl") for i in range(7)]
    upload(eve, "other.jsonl")
    seen, after, pages = [], None, 0
    while True:
        page = client.get("/v1/files", headers=dora, query_string={"limit": 3, **({"after": after} if after else {})})
        assert page.status_code == 200
        body = page.get_json()
        seen += [f["id"] for f in body["data"]]
        pages += 1
        if not body["has_more"]:
            break
        after = body["last_id"]
    assert sorted(seen) == sorted(mine) and len(seen) == 7 and pages == 3
    created = [client.get(f"/v1/files/{i}", headers=dora).get_json()["created_at"] for i in seen]
    assert created == sorted(created, reverse=True)
    everything = client.get("/v1/files", headers=dora).get_json()
    assert [f["id"] for f in everything["data"]] == seen and everything["has_more"] is False
    bad = client.get("/v1/files", headers=dora, query_string={"limit": 0})
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "limit"
    # An `after` that names no file of the caller's (another tenant's, or none) says so.
    theirs = client.get("/v1/files", headers=eve).get_json()["data"][0]["id"]
    for after in (theirs, "file-nope"):
        bad = client.get("/v1/files", headers=dora, query_string={"after": after})
        err = bad.get_json()["error"]
        assert bad.status_code == 404 and err["param"] == "after" and err["code"] == "file_not_found", after


def test_batches_list_in_pages_that_skip_none_of_a_tie(redis_url, r):
    """Batches created in the same millisecond tie on their index score: a page boundary inside the tie
    must not skip the rest of it (paging by an exclusive score did)."""
    tag = uuid.uuid4().hex[:6]
    tenant = f"fay-{tag}"
    client = create_app({"REDIS_URL": redis_url, "TESTING": True,
                         "API_TOKENS": f"{tenant}:tok-fay-{tag}-0123456"}).test_client()
    auth = bearer(f"tok-fay-{tag}-0123456")
    from api import batch_store

    made = [batch_store.create(r, tenant, tenant, "/v1/completions", "file-x", None, None, 1_700_000_000_000).id
            for _ in range(5)]
    seen, after = [], None
    while True:
        body = client.get("/v1/batches", headers=auth,
                          query_string={"limit": 2, **({"after": after} if after else {})}).get_json()
        seen += [b["id"] for b in body["data"]]
        if not body["has_more"]:
            break
        after = body["last_id"]
    assert sorted(seen) == sorted(made) and len(seen) == 5
    bad = client.get("/v1/batches", headers=auth, query_string={"after": "batch_nope"})
    assert bad.status_code == 404 and bad.get_json()["error"]["code"] == "batch_not_found"


def test_a_file_comes_back_under_its_name_whatever_the_name_holds(redis_url, r):
    """The uploader's name goes into Content-Disposition: quotes, control characters and non-ASCII
    must neither break the header nor make the download fail."""
    from werkzeug.http import parse_options_header

    from api import file_store as files

    client = create_app({"REDIS_URL": redis_url, "TESTING": True}).test_client()
    up = client.post("/v1/files", content_type="multipart/form-data",
                     data={"purpose": "batch", "file": (io.BytesIO(b"{}\n"), "näme 漢字; x.jsonl")})
    assert up.status_code == 200 and up.get_json()["filename"] == "näme 漢字; x.jsonl", up.get_json()
    ids = {up.get_json()["id"]: "näme 漢字; x.jsonl"}
    # Names a multipart form cannot carry whole, stored as the upload path stores them.
    for name, shown in (('we"ird".jsonl', 'we"ird".jsonl'),
                        ("a\r\nSet-Cookie: x=1\x07.jsonl", "aSet-Cookie: x=1.jsonl")):
        ids[files.store(r, "anonymous", "batch", name, b"{}\n", int(time.time() * 1000), 600, 10**6).id] = shown
    for file_id, shown in ids.items():
        got = client.get(f"/v1/files/{file_id}/content")
        assert got.status_code == 200 and got.data == b"{}\n"
        assert "Set-Cookie" not in got.headers
        kind, params = parse_options_header(got.headers["Content-Disposition"])
        assert kind == "attachment" and params["filename"] == shown, got.headers["Content-Disposition"]


@pytest.mark.slow
def test_a_batch_survives_its_api_and_its_worker_being_killed_mid_way(redis_url, slow_model, tmp_path):
    """SIGKILL the only API process and the only worker while the batch runs: new ones finish it, each line once."""
    settings = TenantAPI("", tmp_path / "api.log").settings()
    api = start_api(redis_url, tmp_path / "api.log", **settings)
    model = "phoenix-" + uuid.uuid4().hex[:6]
    worker = start_worker(redis_url, model, slow_model, tmp_path, "--parallel", "2")
    oai = client_for(api.url, TenantAPI.ALICE)
    rows = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": model, "prompt": f"line {i}", "max_tokens": 120, "temperature": 0}}
            for i in range(12)]
    f = oai.files.create(file=("p.jsonl", jsonl(rows)), purpose="batch")
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    wait_until(lambda: oai.batches.retrieve(batch.id).request_counts.completed >= 3, timeout=30, interval=0.1,
               what="a few lines done")
    api.kill()
    worker.stop(signal.SIGKILL, timeout=10)
    api = start_api(redis_url, tmp_path / "api.log", **settings)
    worker = start_worker(redis_url, model, slow_model, tmp_path, "--parallel", "2")
    try:
        oai = client_for(api.url, TenantAPI.ALICE)
        done = wait_status(oai, batch.id, {"completed"}, timeout=60)
        out = lines_of(oai, done.output_file_id)
        errors = lines_of(oai, done.error_file_id) if done.error_file_id else {}
        assert not set(out) & set(errors) and set(out) | set(errors) == {f"p{i}" for i in range(12)}
        assert done.request_counts.completed == len(out) and done.request_counts.failed == len(errors)
        # A line cut mid-stream ended WORKER_LOST (it had streamed tokens: never run twice); the rest finished.
        assert {e["response"]["body"]["error"]["code"] for e in errors.values()} <= {"worker_lost"}
        assert all(row["response"]["body"]["choices"][0]["finish_reason"] in ("length", "stop") for row in out.values())
        print(f"\nrestarted batch: {len(out)} lines finished, {len(errors)} lost mid-stream")
        assert len({row["response"]["request_id"] for row in [*out.values(), *errors.values()]}) == 12
    finally:
        api.stop()
        worker.stop(signal.SIGKILL)
