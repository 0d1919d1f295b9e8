"""A decode step stuck past the worker's bound: its jobs are handed on, the worker says so and recovers.

The bound is set low (2 ms) so that every step of the small model passes it, a prefill chunk or a one-token
decode (several ms on 2 cores), whatever the retry finds in the prefix cache: a real step, in a real worker,
that ran past the bound; what a hung GPU call would look like to the rest of the system.
"""
import requests

from queue_schema.lifecycle import registry
from tests.conftest import wait_until
from tests.helpers import events, submit

PROMPT = "the data model of the queue worker " * 30


def test_a_stuck_step_hands_its_jobs_on_with_a_retriable_error(client, r, worker_factory, small_model, live_api):
    w = worker_factory("stuck", small_model, "--parallel", "1", "--threads", "2", "--stuck-step-limit", "0.002")
    job = submit(client, model="stuck", prompt=PROMPT, max_tokens=4, temperature=0)
    evts = events(client, job)
    last = evts[-1]
    # No token streamed: given back once (as for a lost worker), stuck again, then ended for good.
    assert last["type"] == "error" and last["code"] == "INFERENCE_FAILED" and last["retriable"], last
    assert "stuck" in last["message"]
    assert [e["type"] for e in evts].count("queued") == 2
    assert "decode step has run for" in w.log()
    wait_until(lambda: any(w.proc.pid == x.pid and x.state == "idle" for x in registry.live_workers(r)),
               what="the worker serving again")
    metrics = requests.get(live_api + "/metrics", timeout=10).text
    assert any(line.startswith('inferq_worker_stuck_steps_total{model="stuck"}') and float(line.split()[-1]) >= 2
               for line in metrics.splitlines()), [x for x in metrics.splitlines() if "stuck" in x]
