"""Keys that used to grow for ever are swept, and the reaper's paging skips no tie."""
import time
import uuid

from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry

from api import create_app, webhooks
from queue_schema import keys
from queue_schema.lifecycle import reaper as reaper_module
from queue_schema.lifecycle.reaper import Reaper
from tests.helpers import serve_fake_model


def test_rq_ended_registries_drop_expired_entries_without_rq_dashboard(r):
    """RQ cleans these as its own worker runs; inferq runs no RQ worker loop, so they grew until
    rq-dashboard counted them."""
    queue = f"inferq.swept-{uuid.uuid4().hex[:6]}.normal"
    r.sadd(keys.RQ_QUEUES, keys.rq_queue(queue))
    regs = [cls(queue, connection=r) for cls in (FinishedJobRegistry, FailedJobRegistry, CanceledJobRegistry)]
    for reg in regs:
        r.zadd(reg.key, {"expired-job": time.time() - 60, "live-job": time.time() + 3600})
    Reaper(r, "test-sweeper")._sweep_registries()
    for reg in regs:
        assert r.zrange(reg.key, 0, -1) == [b"live-job"], reg.key


def test_an_idle_client_address_leaves_the_tenants_hash(r, redis_url):
    """With auth off every client address is a limit key; once nothing of it is left, it goes (admission
    writes it again at its next submit), so the hash does not grow with every address ever seen."""
    model = "fake-" + uuid.uuid4().hex[:8]
    serve_fake_model(r, model)
    address = f"10.{uuid.uuid4().int % 250}.7.9"
    client = create_app({"REDIS_URL": redis_url, "TESTING": True}).test_client()
    job = client.post("/v1/jobs", json={"operation": "infer", "model": model, "prompt": "x"},
                      environ_base={"REMOTE_ADDR": address}).get_json()["job_id"]
    assert r.hexists(keys.TENANTS, f"addr:{address}")
    Reaper(r, "test-sweeper").sweep()
    assert r.hexists(keys.TENANTS, f"addr:{address}")  # its job is queued: it stays
    client.delete(f"/v1/jobs/{job}")
    Reaper(r, "test-sweeper").sweep()
    assert not r.hexists(keys.TENANTS, f"addr:{address}")


def test_webhook_records_expire_even_when_no_process_can_send_them(r, redis_url):
    """A record written for a job whose delivery no API process can sign used to stay for ever."""
    model = "fake-" + uuid.uuid4().hex[:8]
    serve_fake_model(r, model)
    client = create_app({"REDIS_URL": redis_url, "TESTING": True, "WEBHOOK_SECRET": "whsec_" + "A" * 32,
                         "WEBHOOK_ALLOW_HOSTS": "127.0.0.1"}).test_client()
    job = client.post("/v1/jobs", json={"operation": "infer", "model": model, "prompt": "x",
                                        "webhook_url": "http://127.0.0.1:9/hook"}).get_json()["job_id"]
    r.zrem(keys.WEBHOOKS_DUE, f"job_{job}")  # no process here may send it: only its record is looked at
    client.delete(f"/v1/jobs/{job}")
    r.zrem(keys.WEBHOOKS_DUE, f"job_{job}")
    assert 0 < r.ttl(keys.webhook(f"job_{job}")) <= webhooks.RECORD_TTL_S
    # And schedule entries due long before any record could still exist are dropped.
    r.zadd(keys.WEBHOOKS_DUE, {"job_ancient": 1})
    assert reaper_module.forget_stale_webhooks(r, int(time.time() * 1000)) >= 1
    assert r.zscore(keys.WEBHOOKS_DUE, "job_ancient") is None


def test_paging_by_score_and_member_skips_none_of_a_tie(r):
    """Jobs admitted in one millisecond tie on their score: an exclusive-score cursor skipped the rest of
    a tie that a page ended inside (the open-jobs sweep never looked at them)."""
    key = f"test:tie:{uuid.uuid4().hex}"
    members = {f"job-{i:02d}": 1000 for i in range(7)} | {f"late-{i}": 2000 for i in range(3)}
    r.zadd(key, members)
    seen = [m for page in reaper_module._pages(r, key, 5000, 3) for m in page]
    assert sorted(seen) == sorted(members) and len(seen) == len(members)
    assert [m for page in reaper_module._pages(r, key, 1500, 3) for m in page] == [f"job-{i:02d}" for i in range(7)]
    r.delete(key)
