"""Fair share measured on a real worker: one tenant's flood of 10,000 jobs barely delays another's job.

The figure (printed, run with -s): how many of the flood's jobs started
between the second tenant's submit and its job's start, and its queue wait;
against the same job submitted behind the flood as the flooding tenant's own
(one FIFO queue, what every tenant got before fair share).
"""
import json
import time

import pytest

from queue_schema import keys
from queue_schema.lifecycle import views as jobs
from queue_schema.lifecycle.admission import Admission
from queue_schema.lifecycle.eventlog import EventLog
from queue_schema.lifecycle.tenants import Tenant
from queue_schema.operations import InferOperation
from tests.conftest import wait_until

FLOOD = 10_000
BOUND = 20_000


def started_ms(r, job_ids):
    """Each job's ``started`` event time (seq 1), or None for a job not started."""
    out = {}
    for i in range(0, len(job_ids), 1000):
        pipe = r.pipeline(transaction=False)
        chunk = job_ids[i:i + 1000]
        for job_id in chunk:
            pipe.xrange(keys.job_events(job_id), "1-1", "+", count=2)  # the first take: its fence, then started
        for job_id, entries in zip(chunk, pipe.execute()):
            out[job_id] = None
            event = next((json.loads(f[b"e"]) for _, f in entries if b"e" in f), None)
            if event is not None and event["seq"] == 1:
                out[job_id] = event["ts"] if event["type"] == "started" else None
    return out


def cancel_rest(r, log, job_ids, queue):
    """End the flood's jobs still queued, fast: drop their queue, then one append call per 500 jobs."""
    r.delete(keys.rq_queue(queue))
    rest = [j for j, ts in started_ms(r, job_ids).items() if ts is None]
    for i in range(0, len(rest), 500):
        log.append_many([jobs.cancelled_end(j, 1) for j in rest[i:i + 500]])
    return len(rest)


@pytest.mark.slow
def test_a_flood_delays_another_tenants_job_by_about_one_job_per_slot(r, worker_factory, tiny_model):
    model = "flood"
    worker_factory(model, tiny_model, "--parallel", "2", "--queue-depth", str(BOUND))
    admission, log = Admission(r), EventLog(r)
    op = InferOperation(operation="infer", model=model, prompt="x", max_tokens=1, temperature=0)
    alice, bob = Tenant("alice-flood", "alice-flood"), Tenant("bob-flood", "bob-flood")
    t0 = time.monotonic()
    flood = [admission.admit(op, BOUND, alice).job_id for _ in range(FLOOD)]
    admit_s = time.monotonic() - t0
    queued_then = r.llen(keys.rq_queue(keys.queue_name(model, "normal", alice.name)))
    probe = admission.admit(op, BOUND, bob)
    wait_until(lambda: (lambda e: e is not None and e.terminal)(log.last(probe.job_id)), timeout=30,
               what="the other tenant's job")
    probe_start = started_ms(r, [probe.job_id])[probe.job_id]
    probe_submit = log.replay(probe.job_id)[0].ts
    started = started_ms(r, flood)
    ahead = sum(1 for ts in started.values() if ts is not None and probe_submit <= ts < probe_start)
    fair_wait = probe_start - probe_submit
    # Without fair share: the same job behind `behind` jobs in one FIFO queue (the flooding tenant's).
    remaining = cancel_rest(r, log, flood, keys.queue_name(model, "normal", alice.name))
    behind = 300
    for _ in range(behind):
        admission.admit(op, BOUND, alice)
    fifo_probe = admission.admit(op, BOUND, alice)
    t1 = time.monotonic()
    wait_until(lambda: (lambda e: e is not None and e.terminal)(log.last(fifo_probe.job_id)), timeout=60,
               what="the FIFO probe")
    fifo_wait_s = time.monotonic() - t1
    per_job_ms = fifo_wait_s * 1000 / (behind + 1)
    print(f"\nfair share: {FLOOD} jobs of one tenant admitted in {admit_s:.1f} s ({queued_then} still queued); "
          f"another tenant's job waited {fair_wait} ms behind {ahead} of them (2 slots); its queued position "
          f"estimate was {probe.position}.\nwithout it (one FIFO queue): a job behind {behind} waited "
          f"{fifo_wait_s:.2f} s, {per_job_ms:.1f} ms per job ahead: behind {queued_then} that is "
          f"~{queued_then * per_job_ms / 1000:.0f} s ({remaining} flood jobs were cancelled unrun)")
    assert queued_then > FLOOD / 2, "the worker drained the flood before the probe: nothing measured"
    assert ahead <= 2 * 2  # one job per slot, with slack for the jobs already decoding when it arrived
    assert probe.position <= 2
    assert fair_wait < 20 * per_job_ms + 500
