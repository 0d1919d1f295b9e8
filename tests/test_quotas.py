"""Bounds one tenant cannot push past, on a stack of its own (its own Redis with a maxmemory, API, workers):
batches in flight, bytes of batch results and outputs, Redis memory, and webhook receivers that stall.

Its own stack because every API process on a Redis advances every batch and delivers every webhook: the
session's processes, with other settings, would otherwise do this stack's work.
"""
import json
import time

import openai
import pytest
import redis
import requests

from inferq.client import Client
from inferq.embedded_redis import EmbeddedRedis
from queue_schema import keys
from tests.conftest import TenantAPI, start_api, start_worker, wait_until
from tests.helpers import bearer, metric_samples, serve_fake_model, skip_without_llama_cpp
from tests.test_webhooks import Trickler

MAXMEMORY = 64 << 20
BYTES_CAP = 2500


class Stack:
    pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model, slow_model):
    skip_without_llama_cpp(": embeddings need it")
    tmp = tmp_path_factory.mktemp("quotas")
    s = Stack()
    s.server = EmbeddedRedis(tmp / "redis", appendonly=False, maxmemory=MAXMEMORY).start()
    s.r = redis.Redis.from_url(s.server.url)
    procs = []
    try:
        s.workers = [start_worker(s.server.url, "tiny", tiny_model, tmp, "--backend", "llama-cpp"),
                     start_worker(s.server.url, "slow", slow_model, tmp, "--parallel", "1")]
        settings = {**TenantAPI("", tmp).settings(), "MAX_BATCHES_PER_TENANT": 2,
                    "BATCH_BYTES_PER_TENANT": BYTES_CAP, "WEBHOOK_TIMEOUT_S": 2}
        api = start_api(s.server.url, tmp / "api.log", **settings)
        s.url = api.url
        procs.append(api)
        s.oai = openai.OpenAI(base_url=f"{s.url}/v1", api_key=TenantAPI.ALICE, max_retries=0, timeout=30)
        yield s
    finally:
        for p in procs:
            p.stop()
        for w in getattr(s, "workers", []):
            w.proc.kill()
            w.proc.wait()
        s.server.stop()


def _upload(oai, lines):
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return oai.files.create(file=("in.jsonl", body), purpose="batch")


def _lines(model, n, url="/v1/completions", **body):
    body = body or {"prompt": "x", "max_tokens": 2}
    return [{"custom_id": f"c{i}", "method": "POST", "url": url, "body": {"model": model, **body}}
            for i in range(n)]


def test_a_tenant_has_a_bounded_number_of_batches_in_flight(stack):
    serve_fake_model(stack.r, "nobody")  # its lines wait in the queue: the batches stay in progress
    f = _upload(stack.oai, _lines("nobody", 1))
    held = [stack.oai.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
            for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as info:
        stack.oai.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    assert info.value.body["code"] == "too_many_batches" and info.value.response.headers["Retry-After"]
    # /metrics showed it coming: the tenant's batches in flight against the bound.
    samples = metric_samples(requests.get(f"{stack.url}/metrics", timeout=10).text)
    assert samples[("inferq_tenant_batch_quota_used", (("quota", "batches"), ("tenant", "alice")))] == 2
    assert samples[("inferq_tenant_batch_quota_limit", (("quota", "batches"),))] == 2
    stack.oai.batches.cancel(held[0].id)
    wait_until(lambda: stack.oai.batches.retrieve(held[0].id).status == "cancelled", what="the cancel")
    again = stack.oai.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    for b in (held[1], again):
        stack.oai.batches.cancel(b.id)
        wait_until(lambda: stack.oai.batches.retrieve(b.id).status == "cancelled", what="the cancel")


def test_batch_results_and_outputs_are_bounded_per_tenant(stack):
    """Embeddings asked for as floats take ~25 bytes a dimension in the output: with the bound at 2,500 bytes
    the first line's result is kept, the rest are quota errors, and then no new batch is taken until the
    tenant deletes outputs. Nothing bounded it before (an 8 MB file of such lines wrote tens of GB)."""
    f = _upload(stack.oai, _lines("tiny", 6, "/v1/embeddings", input="the queue worker"))
    batch = stack.oai.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_until(lambda: stack.oai.batches.retrieve(batch.id).status == "completed", timeout=60, what="the batch")
    done = stack.oai.batches.retrieve(batch.id)
    ok = [json.loads(x) for x in stack.oai.files.content(done.output_file_id).text.splitlines()]
    bad = [json.loads(x) for x in stack.oai.files.content(done.error_file_id).text.splitlines()]
    assert len(ok) >= 1 and len(ok) + len(bad) == 6
    assert all(isinstance(v, float) for v in ok[0]["response"]["body"]["data"][0]["embedding"])
    assert bad and all(line["error"]["code"] == "quota_exceeded" for line in bad)
    assert done.request_counts.completed == len(ok) and done.request_counts.failed == len(bad)
    with pytest.raises(openai.RateLimitError) as info:
        stack.oai.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    assert info.value.body["code"] == "batch_quota_exceeded"
    stack.oai.files.delete(done.output_file_id)
    stack.oai.files.delete(done.error_file_id)
    later = stack.oai.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    stack.oai.batches.cancel(later.id)


def test_slow_webhook_receivers_never_stall_batches(stack):
    """Ten deliveries trickling to a receiver that answers a byte every 3 s: a batch submitted after them
    completes in seconds (it was still validating 40 s later when the tick waited for the senders), and
    each attempt ends at its deadline."""
    slow = Trickler(every=3.0)
    try:
        for _ in range(10):
            resp = requests.post(f"{stack.url}/v1/jobs", headers=bearer(TenantAPI.ALICE), timeout=30, json={
                "operation": "infer", "model": "tiny", "prompt": "x", "max_tokens": 2,
                "webhook_url": slow.url + "/hook"})
            assert resp.status_code == 202
        wait_until(lambda: slow.accepted >= 8, timeout=30, what="the senders busy with the slow receiver")
        f = _upload(stack.oai, _lines("tiny", 2))
        began = time.monotonic()
        batch = stack.oai.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        wait_until(lambda: stack.oai.batches.retrieve(batch.id).status == "completed", timeout=20, interval=0.2,
                   what="the batch")
        assert time.monotonic() - began < 20
        def cut_at_deadline():
            records = [stack.r.hgetall(k) for k in stack.r.scan_iter(keys.webhook("job_*"))]
            return any(b"no answer within 2 s" in (rec.get(b"last_error") or b"") for rec in records)

        wait_until(cut_at_deadline, timeout=10, what="an attempt cut at its 2 s deadline")
    finally:
        slow.close()


def test_a_nearly_full_redis_refuses_new_work_and_running_jobs_still_end(stack):
    """Under noeviction a full Redis refuses every write, a running job's end included: admission stops at
    the headroom (10 % below maxmemory) with its own code, and the job running meanwhile writes its end."""
    job = requests.post(f"{stack.url}/v1/jobs", headers=bearer(TenantAPI.ALICE), timeout=30, json={
        "operation": "infer", "model": "slow", "prompt": "go", "max_tokens": 3000, "temperature": 0,
        "repetition_penalty": 1.0, "logit_bias": {"2": -100}}).json()["job_id"]
    wait_until(lambda: stack.r.exists(keys.job_lease(job)), what="the job to start")
    blob, n = b"x" * (1 << 20), 0
    try:
        while stack.r.info("memory")["used_memory"] < MAXMEMORY * 0.93:
            stack.r.set(f"filler:{n}", blob)
            n += 1
        assert stack.r.exists(keys.job_lease(job)), "the job should still be running while Redis is full"
        time.sleep(1.1)  # the API reads INFO memory once a second
        refused = requests.post(f"{stack.url}/v1/jobs", headers=bearer(TenantAPI.ALICE), timeout=30, json={
            "operation": "infer", "model": "tiny", "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "STORAGE_FULL"
        assert refused.headers["Retry-After"]
        with pytest.raises(openai.InternalServerError) as info:
            stack.oai.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert info.value.body["code"] == "storage_full"
        last = list(Client(stack.url, token=TenantAPI.ALICE, timeout=60).events(job))[-1]
        assert last["type"] == "end" and last["tokens_out"] == 3000
    finally:
        for i in range(n):
            stack.r.delete(f"filler:{i}")
    time.sleep(1.1)
    ok = requests.post(f"{stack.url}/v1/jobs", headers=bearer(TenantAPI.ALICE), timeout=30, json={
        "operation": "infer", "model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 202
