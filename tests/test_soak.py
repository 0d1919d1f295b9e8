"""The CI-sized chaos soak: 1,000 jobs through worker SIGKILLs, a Redis freeze and a Redis restart.

The full run (5,000 jobs) is ``python -m bench.soak``; figures in docs/BENCHMARKS.md.
"""
import pytest

from bench.soak import soak

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)  # 66-95 s on 2 cores beside two other test processes: the suite's 120 s is too near
def test_a_thousand_jobs_through_chaos_lose_nothing():
    out = soak(jobs=1000, workers=2, parallel=4, clients=16, kills=4, freezes=1, restarts=1, seed=7,
               timeout_s=600)
    print({k: v for k, v in out.items() if k != "redis_memory"})
    assert out["chaos"] == {"worker kills": 4, "redis freezes": 1, "redis restarts": 1}
    assert out["accepted"] == 1000
    assert out["lost"] == 0 and out["run_twice_after_a_token"] == 0 and out["text_mismatches"] == 0
    assert out["outcomes"].get("WORKER_LOST", 0) <= 4 * 4  # at most what the four killed workers held
