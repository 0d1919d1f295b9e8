"""Settings both sides of the queue must agree on, read once per process and handed down.

The API and every worker write a job's keys and read them back, so the job TTL
is one setting, not a default each module reads from the environment when it is
imported (eventlog.py did, while the API had its own, and the two could
disagree). ``Settings.from_env`` is called once at a process's start (the API's
app factory, the worker's CLI); nothing else reads these variables.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

DAY_S = 24 * 3600


@dataclass(frozen=True)
class RetryAfter:
    """Seconds a refused client is told to wait (``retry_after_s`` on the error; ``Retry-After`` over HTTP)."""

    busy_s: float = 5.0  # a full queue or Redis, a tenant at a bound, an offline model, too many streams
    redis_s: float = 2.0  # Redis unavailable: a Sentinel failover takes a few seconds, a restart about as long
    batches_s: float = 60.0  # a tenant's batches at their bound: one has to end first


@dataclass(frozen=True)
class Settings:
    job_ttl_s: int = DAY_S  # a job's log, RQ hash and result live this long after it ends (INFERQ_JOB_TTL_S)
    # A lease that stands still this long (owners renew every second) is lost (INFERQ_LEASE_STALE_S). Every
    # process that reaps must agree: whichever holds the reaper's role decides. Tests shorten it.
    lease_stale_s: float = 8.0
    retry_after: RetryAfter = field(default_factory=RetryAfter)

    @classmethod
    def from_env(cls, env=None) -> "Settings":
        env = os.environ if env is None else env
        return cls(job_ttl_s=int(env.get("INFERQ_JOB_TTL_S", DAY_S)),
                   lease_stale_s=float(env.get("INFERQ_LEASE_STALE_S", cls.lease_stale_s)))


DEFAULTS = Settings()
