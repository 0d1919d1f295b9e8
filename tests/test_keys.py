"""Key names are a wire contract between processes of possibly different versions: pin them."""
from queue_schema import keys


def test_key_names_are_pinned():
    assert keys.queue_name("tiny", "high") == "inferq.tiny.high"
    assert keys.job_channel("j1") == "inferq:job:{j1}:live"
    assert keys.job_events("j1") == "inferq:job:{j1}:events"
    assert keys.job_settled("j1") == "inferq:job:j1:settled"
    assert keys.EVENTS_STORE == "inferq:events:store" and keys.EVENTS_USERS == "inferq:events:users"
    assert keys.job_cancel("j1") == "inferq:job:j1:cancel"
    assert keys.worker("w1") == "inferq:worker:w1"
    assert keys.job_lease("j1") == "inferq:job:j1:lease"
    assert keys.response("resp_j1") == "inferq:response:resp_j1"
    assert keys.model_wake("tiny") == "inferq:model:tiny:wake"
    assert keys.rq_queue("inferq.tiny.high") == "rq:queue:inferq.tiny.high"
    assert keys.rq_job("j1") == "rq:job:j1"
    assert keys.LEASES == "inferq:leases"
    assert keys.OPEN_JOBS == "inferq:jobs:open"
    assert keys.SETTLING == "inferq:jobs:settling"
    assert keys.REAPER == "inferq:reaper"
    assert keys.model("tiny") == "inferq:model:tiny"
    assert keys.model_workers("tiny") == "inferq:model:tiny:workers"
    assert keys.WORKERS == "inferq:workers"
    assert keys.MODELS == "inferq:models"
    assert keys.CANCEL_CHANNEL == "inferq:cancel"
    assert keys.NARRATION_CHANNEL == "inferq:narration"
    assert keys.NARRATION_LOG == "inferq:narration:log"
    assert keys.PRIORITIES == ("high", "normal", "low", "batch")
    assert keys.INTERACTIVE == ("high", "normal", "low")
    assert keys.queue_name("tiny", "low", "alice") == "inferq.tiny.low@alice"
    assert keys.base_queue_name("inferq.tiny.low@alice") == "inferq.tiny.low"
    assert keys.queue_model("inferq.tiny.v2.low@alice") == keys.queue_model("inferq.tiny.v2.low") == "tiny.v2"
    ring = "inferq:ring:inferq.tiny.low"
    assert keys.queue_ring("inferq.tiny.low@alice") == keys.queue_ring("inferq.tiny.low") == ring
    assert keys.job_info("j1") == "inferq:job:j1:info"
    assert keys.limit_queued("alice") == "inferq:limit:alice:queued"
    assert keys.limit_running("token:ab") == "inferq:limit:token:ab:running"
    assert keys.limit_bucket("addr:1.2.3.4") == "inferq:limit:addr:1.2.3.4:bucket"
    assert keys.tenant_jobs("alice") == "inferq:tenant:alice:jobs"
    assert keys.tenant_files("alice") == "inferq:tenant:alice:files"
    assert keys.tenant_batches("alice") == "inferq:tenant:alice:batches"
    assert keys.tenant_open_batches("alice") == "inferq:tenant:alice:batches:open"
    assert keys.idempotency("alice", "d1") == "inferq:tenant:alice:idem:d1"
    assert keys.JOB_INDEX == "inferq:jobs:index"
    assert keys.TENANTS == "inferq:tenants"
    assert keys.TENANT_COUNTERS == "inferq:stats:tenants"
    assert keys.WEBHOOKS_DUE == "inferq:webhooks:due" and keys.WEBHOOKS_CLAIMED == "inferq:webhooks:claimed"
    assert keys.WEBHOOKS_UNDELIVERED == "inferq:webhooks:undelivered"
    assert keys.WEBHOOK_DELIVERY_HIST == "inferq:stats:hist:webhook_delivery_seconds"
    assert keys.webhook("job_j1") == "inferq:webhook:job_j1"
    assert keys.BATCHES_DUE == "inferq:batches:due" and keys.BATCHES_CLAIMED == "inferq:batches:claimed"
    assert keys.BATCH_TENANTS == "inferq:batches:tenants"
    assert keys.file("file-1") == "inferq:file:file-1"
    assert keys.file_content("file-1") == "inferq:file:file-1:content"
    assert keys.batch("batch_1") == "inferq:batch:batch_1"
    assert keys.batch_lines("b") == "inferq:batch:b:lines"
    assert keys.batch_jobs("b") == "inferq:batch:b:jobs"
    assert keys.batch_ended("b") == "inferq:batch:b:ended"
    assert keys.batch_results("b") == "inferq:batch:b:results"
    assert keys.COUNTERS == "inferq:stats:counters"
    assert keys.histogram("ttft_seconds", "tiny") == "inferq:stats:hist:ttft_seconds:tiny"


def test_no_other_module_spells_a_key():
    import pathlib
    import re

    spelled = re.compile(r"""['"]inferq[:.](job|jobs|worker|workers|model|models|cancel|narration|stats|ring|limit|"""
                         r"""tenant|tenants|webhook|webhooks|file|batch|batches)\b""")

    root = pathlib.Path(__file__).resolve().parent.parent
    offenders = []
    for package in ("api", "worker", "queue_schema", "inferq"):
        for path in (root / package).rglob("*.py"):
            if path.name == "keys.py":
                continue
            text = path.read_text()
            if spelled.search(text):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_histograms_write_one_bucket_and_read_cumulative(r):
    """An observation is one HINCRBY of its own bucket (and the sum); the scrape sums them into Prometheus's
    cumulative buckets, on top of the cumulative fields older versions wrote."""
    from queue_schema.lifecycle import stats

    model = "hist-" + __import__("uuid").uuid4().hex[:6]
    key = keys.histogram("ttft_seconds", model)
    try:
        # What an older version wrote for 0.004 and 0.3: every bound at or above each value, cumulatively.
        old = {str(bound): sum(v <= bound for v in (0.004, 0.3)) for bound in stats.BUCKETS["ttft_seconds"]}
        r.hset(key, mapping={**{k: v for k, v in old.items() if v}, "+Inf": 2, "sum": 0.304})
        pipe = r.pipeline(transaction=False)
        for value in (0.004, 0.02, 0.3, 7.0, 99.0):
            stats.observe(pipe, "ttft_seconds", model, value)
        sent = len(pipe.command_stack)
        pipe.execute()
        assert sent == 2 * 5
        buckets, total = stats.read_histogram(r, "ttft_seconds", model)
        got = dict(buckets)
        values = [0.004, 0.3, 0.004, 0.02, 0.3, 7.0, 99.0]
        for bound in stats.BUCKETS["ttft_seconds"]:
            assert got[str(bound)] == sum(v <= bound for v in values), bound
        assert got["+Inf"] == len(values) and abs(total - sum(values)) < 1e-9
    finally:
        r.delete(key)
