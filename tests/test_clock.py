"""One clock for the fleet: workers whose own clocks are 30 s off serve, keep ttl_s and evict no peer.

Real worker processes whose wall clock is shifted (tests/skewclock.c, preloaded: CLOCK_REALTIME only, as
on a host whose clock is wrong); the API process and Redis keep the true time.
"""
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from queue_schema import keys
from queue_schema.lifecycle import registry
from tests.conftest import start_worker, wait_until
from tests.helpers import events, submit

SHIM = Path(__file__).with_name("skewclock.c")


@pytest.fixture(scope="module")
def skew_lib(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the clock shim")
    out = tmp_path_factory.mktemp("skew") / "skewclock.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(SHIM), "-ldl"], check=True)
    return out


def _skewed(redis_url, model, path, tmp, lib, seconds):
    return start_worker(redis_url, model, path, tmp, "--parallel", "1",
                        prefix=("env", f"LD_PRELOAD={lib}", f"INFERQ_SKEW_S={seconds}"))


def test_workers_30s_ahead_and_behind_serve_and_keep_ttl(client, redis_url, r, tiny_model, tmp_path, skew_lib):
    model = "skew"
    ahead = _skewed(redis_url, model, tiny_model, tmp_path, skew_lib, 30)
    behind = None
    try:
        # Ahead by 30 s: a job with ttl_s 20 that waited milliseconds must run (it used to end TIMEOUT at once,
        # "waited 30.0 s in the queue").
        job = submit(client, model=model, prompt="def data", max_tokens=4, temperature=0, ttl_s=20)
        evts = events(client, job)
        assert evts[-1]["type"] == "end", evts[-1]
        assert next(e for e in evts if e["type"] == "started")["queue_wait_ms"] < 10_000
        behind = _skewed(redis_url, model, tiny_model, tmp_path, skew_lib, -30)
        # Both stay in the model's set through several heartbeats: the one ahead evicted the other before.
        time.sleep(3 * registry.HEARTBEAT_INTERVAL_S)
        assert r.zcard(keys.model_workers(model)) == 2
        assert {w.pid for w in registry.live_workers(r) if w.model == model} == {ahead.proc.pid, behind.proc.pid}
        # Behind by 30 s, alone: submits are taken (every one answered 503 MODEL_OFFLINE before).
        ahead.stop()
        wait_until(lambda: r.zcard(keys.model_workers(model)) == 1, what="the stopped worker gone")
        for _ in range(3):
            job = submit(client, model=model, prompt="def data", max_tokens=4, temperature=0, ttl_s=20)
            assert events(client, job)[-1]["type"] == "end"
    finally:
        for w in (ahead, behind):
            if w is not None and w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
