"""Tenants: who owns a job, file or batch, and the limits admission counts per tenant.

A job belongs to the tenant that submitted it (``Tenant.name``); another
tenant reading, streaming, cancelling or listing it gets a 404 as if it did
not exist. Limits count by ``Tenant.limit_key`` (api/auth.py: a named tenant,
a bare token, or a client address while auth is off).

The counts the limits read are never counters that could drift: they are the
sizes of two sets per limit key that the scripts moving a job keep exactly —
admission adds the job to ``queued``; the lease script (queue_schema.lifecycle.leases)
moves it to ``running`` in the step that takes it off its queue; a requeue
moves it back; the terminal append (queue_schema.lifecycle.eventlog) takes it out of
both. Every path that ends a job writes its terminal event through that one
script, so none can leave a job counted. The reaper's sweep also drops
members whose job is gone, in case Redis itself lost writes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from queue_schema import keys
from queue_schema.lifecycle import scripts

ANONYMOUS = "anonymous"  # the one tenant while auth is off
SHARED = "default"  # the tenant of bare tokens


@dataclass(frozen=True)
class Tenant:
    """Who owns what is submitted, and the key its limits count by."""

    name: str
    limit_key: str

    @property
    def queue_suffix(self) -> str | None:
        """The tenant's own RQ queue suffix; with auth off everything is one tenant's, on the model's queue."""
        return None if self.name == ANONYMOUS else self.name


NOBODY = Tenant(ANONYMOUS, ANONYMOUS)


@dataclass(frozen=True)
class Limits:
    """Per limit key; 0 turns a limit off."""

    submits_per_s: float = 0.0
    burst: int = 0  # bucket size; 0: max(1, ceil(2 x the rate))
    max_queued: int = 0
    max_running: int = 0

    @property
    def bucket(self) -> int:
        return self.burst or max(1, math.ceil(2 * self.submits_per_s))


NO_LIMITS = Limits()


def owner(client: redis.Redis, job_id: str) -> str | None:
    """The tenant a job belongs to; None for a job inferq did not admit (RQ's own API) or long expired."""
    raw = client.hget(keys.job_info(job_id), "tenant")
    return raw.decode() if raw is not None else None


def counts(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """(queued, running) per tenant name, summed over its limit keys, for /metrics."""
    names = {k.decode(): v.decode() for k, v in client.hgetall(keys.TENANTS).items()}
    pipe = client.pipeline(transaction=False)
    for limit_key in names:
        pipe.scard(keys.limit_queued(limit_key))
        pipe.scard(keys.limit_running(limit_key))
    sizes = pipe.execute()
    out: dict[str, tuple[int, int]] = {}
    for i, limit_key in enumerate(names):
        queued, running = out.get(names[limit_key], (0, 0))
        out[names[limit_key]] = (queued + sizes[2 * i], running + sizes[2 * i + 1])
    return out


def read_counters(client: redis.Redis) -> dict[str, dict[str, int]]:
    """counter -> tenant -> count (submitted, finished, failed, cancelled)."""
    out: dict[str, dict[str, int]] = {}
    for field, value in client.hgetall(keys.TENANT_COUNTERS).items():
        counter, _, tenant = field.decode().partition("|")
        out.setdefault(counter, {})[tenant] = int(value)
    return out


_TIDY = scripts.load("tenants_tidy")


def tidy(client: redis.Redis) -> int:
    """Drop set members whose job ended or went away, and limit keys nothing is left of; how many members
    were dropped."""
    dropped = 0
    for limit_key in client.hkeys(keys.TENANTS):
        limit_key = limit_key.decode()
        dropped += int(_TIDY(client, {"queued": keys.limit_queued(limit_key), "running": keys.limit_running(limit_key),
                                      "bucket": keys.limit_bucket(limit_key), "tenants": keys.TENANTS,
                                      "open_jobs": keys.OPEN_JOBS},
                             {"limit_key": limit_key}))
    return dropped
