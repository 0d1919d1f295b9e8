"""/metrics shows an operator the one Redis primary's limits coming: its CPU per generated token, its memory
against maxmemory, each tenant's quota use against its bound, and how far behind webhook delivery is.

On a stack of its own (its own Redis, two API processes, a worker): the test sets maxmemory on that Redis, and
every API process on a Redis delivers every webhook, so the session's would otherwise do this stack's work.
Two API processes because each reads what it shows from Redis: both must show the same, none its own share.
"""
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
import requests

from api import webhooks
from api.quota_metrics import QUOTAS
from inferq.client import Client
from inferq.embedded_redis import EmbeddedRedis
from queue_schema import keys
from tests.conftest import TenantAPI, start_api, start_worker, wait_until
from tests.helpers import bearer, metric_samples, serve_fake_model

CAROL = "tok-carol-live-0123456789"
LIMITS = {"MAX_QUEUED_PER_TENANT": 5, "MAX_RUNNING_PER_TENANT": 4, "SUBMITS_PER_S": 0.5, "SUBMIT_BURST": 20,
          "FILES_MAX_BYTES_PER_TENANT": 100_000, "MAX_BATCHES_PER_TENANT": 3, "BATCH_BYTES_PER_TENANT": 50_000}


class Stack:
    pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("operator-metrics")
    s = Stack()
    s.server = EmbeddedRedis(tmp / "redis", appendonly=False).start()
    s.r = redis.Redis.from_url(s.server.url)
    s.apis = []
    try:
        s.worker = start_worker(s.server.url, "tiny", tiny_model, tmp)
        s.settings = {**TenantAPI("", tmp).settings(), **LIMITS, "WEBHOOK_TIMEOUT_S": 2,
                      "API_TOKENS": f"alice:{TenantAPI.ALICE},bob:{TenantAPI.BOB},carol:{CAROL}"}
        s.apis = [start_api(s.server.url, tmp / f"api-{i}.log", **s.settings) for i in range(2)]
        s.tmp = tmp
        yield s
    finally:
        for api in s.apis:
            api.stop()
        if getattr(s, "worker", None):
            s.worker.proc.kill()
            s.worker.proc.wait()
        s.server.stop()


def scrape(url: str) -> dict:
    resp = requests.get(f"{url}/metrics", timeout=10)
    assert resp.status_code == 200
    return metric_samples(resp.text)


def value(samples: dict, name: str, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def tokens(samples: dict) -> float:
    return sum(v for (name, _), v in samples.items() if name == "inferq_tokens_generated_total")


def run_job(url: str, token: str, **fields) -> dict:
    body = {"operation": "infer", "model": "tiny", "prompt": "the queue", "max_tokens": 32, "temperature": 0,
            "logit_bias": {"2": -100}, **fields}  # no end-of-sequence: every job runs to max_tokens
    resp = requests.post(f"{url}/v1/jobs", json=body, headers=bearer(token), timeout=30)
    assert resp.status_code == 202, resp.text
    return list(Client(url, token=token, timeout=60).events(resp.json()["job_id"]))[-1]


def test_redis_cpu_per_generated_token_is_shown_beside_the_token_counter(stack):
    """A process's first scrape has no interval to measure over; after jobs generated tokens its gauge is the
    Redis CPU its two scrapes saw over the tokens they saw, and another process shows the same totals."""
    fresh = start_api(stack.server.url, stack.tmp / "api-fresh.log", **stack.settings)
    try:
        first = scrape(fresh.url)
        assert value(first, "inferq_redis_cpu_per_token_seconds") is None
        cpu0, tok0 = value(first, "inferq_redis_cpu_seconds_total"), tokens(first)
        assert cpu0 > 0
        ends = [run_job(stack.apis[0].url, TenantAPI.ALICE, prompt=f"job {i}") for i in range(2)]
        assert all(e["type"] == "end" for e in ends)
        generated = sum(e["tokens_out"] for e in ends)
        assert generated > 0
        # The worker counts a job's tokens just after its end event.
        wait_until(lambda: tokens(scrape(fresh.url)) >= tok0 + generated, what="the tokens counted")
        second = scrape(fresh.url)
        cpu1, tok1 = value(second, "inferq_redis_cpu_seconds_total"), tokens(second)
        assert tok1 - tok0 == generated
        assert cpu1 > cpu0
        per_token = value(second, "inferq_redis_cpu_per_token_seconds")
        assert per_token is not None and 0 < per_token < 0.05
        # Its window began at this process's first scrape (the wait's scrapes fall inside it).
        assert per_token == pytest.approx((cpu1 - cpu0) / (tok1 - tok0), rel=1e-9)
        other = scrape(stack.apis[1].url)
        assert tokens(other) == tok1  # read from Redis: no process counts only its own, nor twice
        assert abs(value(other, "inferq_redis_cpu_seconds_total") - cpu1) < 1.0
    finally:
        fresh.stop()


def test_redis_memory_is_shown_against_the_maxmemory_set_on_it(stack):
    before = scrape(stack.apis[0].url)
    assert value(before, "inferq_redis_maxmemory_bytes") == 0  # no limit
    assert value(before, "inferq_redis_memory_used_ratio") is None  # a ratio to no limit would read 0 % full
    limit = 256 << 20
    stack.r.config_set("maxmemory", limit)
    filler = [f"filler:{i}" for i in range(16)]
    try:
        shown = scrape(stack.apis[1].url)
        assert value(shown, "inferq_redis_maxmemory_bytes") == limit
        used = value(shown, "inferq_redis_used_memory_bytes")
        assert 0 < used < limit
        assert value(shown, "inferq_redis_memory_used_ratio") == pytest.approx(used / limit)
        assert value(shown, "inferq_redis_memory_refuse_ratio") == pytest.approx(0.9)  # INFERQ_REDIS_HEADROOM 0.1
        for key in filler:
            stack.r.set(key, b"x" * (1 << 20))
        fuller = scrape(stack.apis[0].url)
        assert value(fuller, "inferq_redis_memory_used_ratio") - used / limit > 15 / 256
    finally:
        stack.r.delete(*filler)
        stack.r.config_set("maxmemory", 0)
    assert value(scrape(stack.apis[0].url), "inferq_redis_maxmemory_bytes") == 0


def test_each_tenants_quota_use_is_shown_against_its_bound(stack):
    """Bob's queued jobs, submits taken from his bucket, files and batches, read by the API process that did not
    take them; carol, configured and idle, shows zeros; a tenant not configured has no series at all."""
    serve_fake_model(stack.r, "parked")  # nobody runs its jobs: they stay queued
    stack.r.hset(keys.TENANTS, "mallory", "mallory")  # left by an old configuration
    stack.r.sadd(keys.limit_queued("mallory"), "gone")
    head = bearer(TenantAPI.BOB)
    jobs, began = [], time.monotonic()
    for i in range(3):
        resp = requests.post(f"{stack.apis[0].url}/v1/jobs", headers=head, timeout=30, json={
            "operation": "infer", "model": "parked", "prompt": f"wait {i}", "max_tokens": 2})
        assert resp.status_code == 202, resp.text
        jobs.append(resp.json()["job_id"])
    line = b'{"custom_id": "c0", "method": "POST", "url": "/v1/completions", "body": {"model": "parked", ' \
           b'"prompt": "x", "max_tokens": 2}}\n'
    upload = requests.post(f"{stack.apis[0].url}/v1/files", headers=head, timeout=30,
                           files={"file": ("in.jsonl", line)}, data={"purpose": "batch"})
    assert upload.status_code == 200, upload.text
    batch = requests.post(f"{stack.apis[0].url}/v1/batches", headers=head, timeout=30, json={
        "input_file_id": upload.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"}).json()
    try:
        shown = scrape(stack.apis[1].url)
        refilled = 0.5 * (time.monotonic() - began)  # INFERQ_SUBMITS_PER_S since the first submit
        used = {q: value(shown, "inferq_tenant_quota_used", tenant="bob", quota=q) for q in QUOTAS}
        limit = {q: value(shown, "inferq_tenant_quota_limit", quota=q) for q in QUOTAS}
        assert used["queued_jobs"] == 3 and limit["queued_jobs"] == 5
        assert used["running_jobs"] == 0 and limit["running_jobs"] == 4
        assert 3 - refilled - 0.01 <= used["submit_burst"] <= 3 and limit["submit_burst"] == 20
        assert used["file_bytes"] == len(line) and limit["file_bytes"] == 100_000
        assert used["batches"] == 1 and limit["batches"] == 3
        assert used["batch_bytes"] == 0 and limit["batch_bytes"] == 50_000
        assert all(value(shown, "inferq_tenant_quota_used", tenant="carol", quota=q) == 0 for q in QUOTAS)
        assert not [k for k in shown if k[0] == "inferq_tenant_quota_used" and ("tenant", "mallory") in k[1]]
        for job in jobs:
            assert requests.delete(f"{stack.apis[0].url}/v1/jobs/{job}", headers=head, timeout=10).ok
        wait_until(lambda: value(scrape(stack.apis[0].url), "inferq_tenant_quota_used", tenant="bob",
                                 quota="queued_jobs") == 0, timeout=10, what="the cancelled jobs uncounted")
    finally:
        requests.post(f"{stack.apis[0].url}/v1/batches/{batch['id']}/cancel", headers=head, timeout=10)
        stack.r.hdel(keys.TENANTS, "mallory")
        stack.r.delete(keys.limit_queued("mallory"))


class StallingReceiver:
    """A webhook receiver that holds every request until released, then answers 200 at once."""

    def __init__(self):
        self.release, self.seen = threading.Event(), 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.seen += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                if not outer.release.wait(60):
                    return
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # an attempt the sender cut at its deadline
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_webhook_lag_grows_while_a_receiver_stalls(stack):
    """Each attempt is cut at its 2 s deadline and retried: the delivery is in flight or waiting for its retry,
    never due for long, so only its event's age shows the lag. Once the receiver answers it falls to 0, and the
    delivery's whole wait is in the histogram."""
    receiver = StallingReceiver()
    try:
        before = scrape(stack.apis[0].url)
        assert value(before, "inferq_webhook_oldest_undelivered_age_seconds") == 0
        delivered0 = value(before, "inferq_webhook_delivery_seconds_count") or 0
        quick0 = value(before, "inferq_webhook_delivery_seconds_bucket", le="0.5") or 0
        end = run_job(stack.apis[0].url, TenantAPI.ALICE, webhook_url=receiver.url + "/hook")
        wait_until(lambda: receiver.seen >= 1, timeout=15, what="the first attempt")
        first = scrape(stack.apis[1].url)
        age = value(first, "inferq_webhook_oldest_undelivered_age_seconds")
        assert age > 0
        time.sleep(2.5)
        later = scrape(stack.apis[0].url)
        assert value(later, "inferq_webhook_oldest_undelivered_age_seconds") >= age + 2
        assert value(later, "inferq_webhook_deliveries_pending") + \
            value(later, "inferq_webhook_deliveries_in_flight") == 1
        assert (value(later, "inferq_webhook_delivery_seconds_count") or 0) == delivered0
        stalled = value(later, "inferq_webhook_oldest_undelivered_age_seconds")
        receiver.release.set()
        deliveries = webhooks.Deliveries(stack.r)
        wait_until(lambda: deliveries.record(f"job_{end['job_id']}").get("result") == "delivered", timeout=30,
                   what="the delivery")
        after = scrape(stack.apis[1].url)
        assert value(after, "inferq_webhook_oldest_undelivered_age_seconds") == 0
        assert value(after, "inferq_webhook_delivery_seconds_count") == delivered0 + 1
        assert value(after, "inferq_webhook_delivery_seconds_sum") >= stalled
        assert value(after, "inferq_webhook_delivery_seconds_bucket", le="0.5") == quick0
    finally:
        receiver.close()
