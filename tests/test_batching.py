"""Continuous batching: one worker decodes several jobs at once, and each keeps the whole contract."""
import signal
import subprocess
import sys
import time

import pytest
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from queue_schema import keys
from queue_schema.lifecycle import registry, stats
from queue_schema.lifecycle import views as job_views
from tests.conftest import ROOT, wait_until
from tests.helpers import events, stopped, submit, text_of

LONG = dict(max_tokens=3000, temperature=0, repetition_penalty=1.0)  # runs for seconds on the slow model
PROMPTS = ["the data model", "import queue", "def worker", "class token stream"]


def worker_of(r, job_id):
    return next((w for w in registry.live_workers(r) if job_id in w.jobs), None)


def test_batched_greedy_outputs_agree_with_the_same_prompts_run_alone(client, worker_factory, tiny_model):
    worker_factory("batch4", tiny_model, "--parallel", "4")
    worker_factory("alone", tiny_model, "--parallel", "1")
    fields = dict(max_tokens=48, temperature=0, repetition_penalty=1.0)
    together = [submit(client, model="batch4", prompt=p, **fields) for p in PROMPTS]
    batched = [text_of(events(client, j)) for j in together]
    alone = [text_of(events(client, submit(client, model="alone", prompt=p, **fields))) for p in PROMPTS]
    # llama.cpp promises no bitwise equality across batch sizes; on this F32 model they agree exactly.
    same = sum(a == b for a, b in zip(batched, alone))
    print(f"batched vs alone: {same}/{len(PROMPTS)} identical")
    assert same == len(PROMPTS), list(zip(batched, alone))


def test_a_worker_runs_its_jobs_together_and_the_books_show_them_all(client, r, worker_factory, slow_model):
    worker_factory("together", slow_model, "--parallel", "3")
    ids = [submit(client, model="together", prompt=p, **LONG) for p in ("busy", "watch", "other")]
    for j in ids:
        assert events(client, j, until="token")[-1]["type"] == "token"
    # All three stream at once on one worker: its record, RQ's started registry, /metrics.
    w = wait_until(lambda: worker_of(r, ids[0]), what="the worker's record")
    assert w.slots == 3 and sorted(w.jobs) == sorted(ids) and w.state == "busy"
    shown = client.get("/v1/workers").get_json()["workers"]
    assert any(sorted(x["jobs"]) == sorted(ids) and x["slots"] == 3 for x in shown)
    started = StartedJobRegistry(keys.queue_name("together", "normal"), connection=r, serializer=JSONSerializer)
    assert sorted(started.get_job_ids(cleanup=False)) == sorted(ids)
    assert all(job_views.Job.fetch(j, connection=r, serializer=JSONSerializer).worker_name == w.id for j in ids)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'inferq_worker_busy_slots{{model="together",worker="{w.id}"}} 3.0' in metrics
    assert f'inferq_worker_slots{{model="together",worker="{w.id}"}} 3.0' in metrics
    for j in ids:
        client.delete(f"/v1/jobs/{j}")
    assert all(events(client, j)[-1]["stop_reason"] == "cancelled" for j in ids)


def test_cancel_during_decode_stops_one_job_and_the_others_stream_on(client, worker_factory, slow_model):
    worker_factory("cancel3", slow_model, "--parallel", "3")
    ids = [submit(client, model="cancel3", prompt=p, **{**LONG, "max_tokens": 1500}) for p in ("busy", "watch", "go")]
    for j in ids:
        events(client, j, until="token")
    t0 = time.monotonic()
    assert client.delete(f"/v1/jobs/{ids[0]}").status_code == 202
    cancelled = events(client, ids[0])
    took = time.monotonic() - t0
    assert cancelled[-1]["type"] == "end" and cancelled[-1]["stop_reason"] == "cancelled"
    assert took < 0.5, took  # a step or two: the scheduler looks at cancels before every decode
    for j in ids[1:]:
        evts = events(client, j)
        assert evts[-1]["type"] == "end" and evts[-1]["stop_reason"] == "max_tokens"
        assert evts[-1]["text"] == text_of(evts) and evts[-1]["tokens_out"] == 1500
        assert [e["i"] for e in evts if e["type"] == "token"] == sorted({e["i"] for e in evts if e["type"] == "token"})


def test_one_job_failing_leaves_the_others_running(client, worker_factory, slow_model):
    worker_factory("mixed", slow_model, "--parallel", "3")
    good = [submit(client, model="mixed", prompt=p, max_tokens=200, temperature=0, repetition_penalty=1.0)
            for p in ("busy", "watch")]
    bad = submit(client, model="mixed", prompt="word " * 4000, max_tokens=200)  # past the 4096-token context
    assert events(client, bad)[-1]["code"] == "CONTEXT_LENGTH_EXCEEDED"
    for j in good:
        last = events(client, j)[-1]
        assert last["type"] == "end" and last["tokens_out"] == 200


def test_sigkill_with_jobs_running_requeues_or_loses_each_of_them(client, r, worker_factory, slow_model):
    victim = worker_factory("killed4", slow_model, "--parallel", "3")
    streaming = [submit(client, model="killed4", prompt=p, **LONG) for p in ("busy", "watch")]
    for j in streaming:
        events(client, j, until="token")
    # One more, caught before its first token: its prompt takes a while to prefill.
    late = submit(client, model="killed4", prompt="the data model of the queue worker " * 100, max_tokens=5,
                  temperature=0)
    wait_until(lambda: any(e["type"] == "started" for e in events(client, late, limit=2)), interval=0.005,
               what="the late job to start")
    victim.proc.send_signal(signal.SIGKILL)
    worker_factory("killed4", slow_model, "--parallel", "3")  # a survivor: its reaper and its slots
    for j in streaming:
        last = events(client, j)[-1]
        assert last["type"] == "error" and last["code"] == "WORKER_LOST" and last["retriable"]
    evts = events(client, late)
    kinds = [e["type"] for e in evts]
    if "token" in kinds[:kinds.index("started") + 3] and kinds.count("started") == 1:
        assert evts[-1]["code"] == "WORKER_LOST"  # it had streamed a token before the kill after all
    else:
        assert kinds.count("started") == 2 and evts[-1]["type"] == "end" and evts[-1]["tokens_out"] == 5
        assert any(e["type"] == "narration" and e["action"] == "requeue" for e in evts)
    assert [e["seq"] for e in evts] == list(range(len(evts)))


def test_ctransformers_refuses_parallel_with_one_line(tiny_model, redis_url):
    proc = subprocess.run([sys.executable, "-m", "inferq", "worker", "--model", f"ct={tiny_model}", "--backend",
                           "ctransformers", "--parallel", "4", "--redis-url", redis_url], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "--parallel 1" in errors[0], proc.stderr


def test_queue_position_and_eta_count_every_slot(client, r, worker_factory, tiny_model):
    w = worker_factory("eta2", tiny_model, "--parallel", "2")
    events(client, submit(client, model="eta2", prompt="warm", max_tokens=3))
    per_job = wait_until(lambda: stats.job_seconds(r, "eta2"), what="the job-time average")
    w.proc.send_signal(signal.SIGSTOP)
    try:
        # Stopped before the first submit: a worker still running could take it, and the position would be 1.
        wait_until(lambda: stopped(w.proc.pid), what="the worker to stop")
        waiting = [submit(client, model="eta2", prompt=f"wait {i}", max_tokens=2) for i in range(3)]
        queued = events(client, waiting[2], limit=1)[0]
        status = client.get(f"/v1/jobs/{waiting[2]}").get_json()
    finally:
        w.proc.send_signal(signal.SIGCONT)
    # Two jobs ahead, two slots: it starts after about (2 + 1) / 2 job-times.
    assert queued["position"] == 2 and status["position"] == 2
    assert queued["eta_s"] == pytest.approx(3 * per_job / 2, rel=0.2, abs=0.002)
    assert status["eta_s"] == pytest.approx(3 * per_job / 2, rel=0.2, abs=0.002)
    for j in waiting:
        assert events(client, j)[-1]["type"] == "end"


def test_a_prompt_that_begins_with_a_cached_one_skips_that_prefill(client, worker_factory, slow_model):
    worker_factory("prefix", slow_model, "--parallel", "2")
    system = "the data model of the queue worker " * 30
    first = events(client, submit(client, model="prefix", prompt=system + "one", max_tokens=4, temperature=0))
    second = events(client, submit(client, model="prefix", prompt=system + "two", max_tokens=4, temperature=0))
    m1 = next(e for e in first if e["type"] == "metrics")
    m2 = next(e for e in second if e["type"] == "metrics")
    assert m1["cached_tokens"] == 0
    # Everything but the last few tokens came from the cache.
    assert m2["prompt_tokens"] - 10 <= m2["cached_tokens"] < m2["prompt_tokens"]


@pytest.mark.slow
def test_cancel_lands_within_a_step_during_a_long_prefill(client, worker_factory, small_model):
    worker_factory("prefill", small_model, "--parallel", "2", "--threads", "2")
    other = submit(client, model="prefill", prompt="busy", max_tokens=400, temperature=0, repetition_penalty=1.0)
    events(client, other, until="token")
    job = submit(client, model="prefill", prompt="the data model of the queue worker " * 80, max_tokens=8)
    wait_until(lambda: any(e["type"] == "narration" and e["action"] == "start"
                           for e in events(client, job, limit=3)), interval=0.01, what="the prefill to begin")
    time.sleep(0.3)  # well into the ~2,000-token prefill (over a second on this model)
    t0 = time.monotonic()
    client.delete(f"/v1/jobs/{job}")
    evts = events(client, job)
    took = time.monotonic() - t0
    assert evts[-1]["stop_reason"] == "cancelled" and evts[-1]["tokens_out"] == 0
    # Landed within a step, not after the prefill: against a whole prefill of a prompt as long (another text,
    # so nothing is cached), timed here under the same load rather than against a figure for a quiet machine.
    t1 = time.monotonic()
    whole = submit(client, model="prefill", prompt="the queue worker of the data model " * 80, max_tokens=1,
                   temperature=0)
    assert events(client, whole)[-1]["type"] == "end"
    prefill = time.monotonic() - t1
    assert took < prefill / 3, (took, prefill)
    assert events(client, other)[-1]["type"] == "end"


def test_streams_keep_flowing_while_a_long_prompt_prefills(client, worker_factory, slow_model):
    """A long prompt is prefilled in chunks between the running job's tokens, not in one step that stalls it:
    the running job keeps producing tokens while the long one prefills (between its start and its first
    token). Counted, not timed: a loaded machine slows both alike."""
    worker_factory("interleave", slow_model, "--parallel", "2")
    running = submit(client, model="interleave", prompt="busy", max_tokens=3000, temperature=0,
                     repetition_penalty=1.0, logit_bias={"2": -100})
    events(client, running, until="token")
    long_job = submit(client, model="interleave", prompt="the data model of the queue worker " * 110,
                      max_tokens=4, temperature=0)
    long_events = events(client, long_job)
    assert long_events[-1]["type"] == "end"
    began = next(e["ts"] for e in long_events if e["type"] == "narration" and e["action"] == "start")
    first = next(e["ts"] for e in long_events if e["type"] == "token")
    client.delete(f"/v1/jobs/{running}")
    during = [e for e in events(client, running) if e["type"] == "token" and began <= e["ts"] <= first]
    # ~880 prompt tokens in chunks sized for ~50 ms steps: many steps, each with the running job's token.
    assert len(during) >= 5, len(during)


def test_the_health_probe_runs_in_the_slot_given_and_leaves_the_others_caches_alone(tiny_model):
    """After a failed decode the scheduler probes the model in a free slot; a sequence in another slot
    must go on from its cache exactly as if no probe had run."""
    import numpy as np

    from worker.backends import LoadOptions, load_backend
    from worker.backends.base import Chunk

    backend = load_backend("llama-cpp", str(tiny_model), LoadOptions(threads=1, parallel=2))
    prompt = backend.tokenize("the data model")

    def next_logits(probe: bool):
        backend.forget(0, 0)
        backend.decode([Chunk(0, prompt, 0, True)])
        if probe:
            assert backend.health(1) is True
        row = backend.decode([Chunk(0, [prompt[-1]], len(prompt), True)])[0]
        return np.array(backend.logits(row))

    try:
        assert np.array_equal(next_logits(False), next_logits(True))
    finally:
        backend.close()
