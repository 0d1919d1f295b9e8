"""Each tenant's quota use beside its limit, for ``/metrics``: a tenant about to get 429s shows here first.

The series are one per configured tenant (the names ``INFERQ_API_TOKENS`` and ``INFERQ_ADMIN_TOKENS`` give,
or ``anonymous`` while auth is off) and quota, so their number is bounded by the configuration, never by
who calls. Use is counted the way the bound is checked: queued and running jobs and the submit bucket per
limit key (a tenant with several bare tokens, or auth off with several client addresses, is bounded per
key, so the fullest key is shown); files and batches per tenant.
"""
from __future__ import annotations

from dataclasses import dataclass

import redis
from prometheus_client.core import GaugeMetricFamily

from api import batch_store
from queue_schema import keys
from queue_schema.lifecycle import clock
from queue_schema.lifecycle.tenants import ANONYMOUS, NO_LIMITS, Limits

QUOTAS = ("queued_jobs", "running_jobs", "submit_burst", "file_bytes", "batches", "batch_bytes")
USED_HELP = ("A tenant's use of each quota: queued_jobs and running_jobs (its jobs waiting and leased), "
             "submit_burst (submits taken from its token bucket, which refills at INFERQ_SUBMITS_PER_S), "
             "file_bytes (its files in Redis), batches (in flight) and batch_bytes (its batch results and "
             "outputs); per limit key where the bound is (the fullest key of the tenant's)")


@dataclass(frozen=True)
class Quotas:
    """The bounds each tenant (or limit key) is held to; 0: none."""

    jobs: Limits = NO_LIMITS
    file_bytes: int = 0
    batches: int = 0
    batch_bytes: int = 0

    @classmethod
    def from_config(cls, cfg, jobs: Limits) -> Quotas:
        """``jobs``: what admission is given (api.jobs.tenant_limits)."""
        return cls(jobs, int(cfg["FILES_MAX_BYTES_PER_TENANT"]), int(cfg["MAX_BATCHES_PER_TENANT"]),
                   int(cfg["BATCH_BYTES_PER_TENANT"]))

    def limit(self, quota: str) -> float:
        return {"queued_jobs": self.jobs.max_queued, "running_jobs": self.jobs.max_running,
                "submit_burst": self.jobs.bucket if self.jobs.submits_per_s > 0 else 0,
                "file_bytes": self.file_bytes, "batches": self.batches, "batch_bytes": self.batch_bytes}[quota]


def configured_tenants(tokens) -> dict[str, set[str] | None]:
    """Tenant name -> the limit keys the configuration gives it, from api.auth's (token, principal) pairs.
    ``tokens`` None is auth off: one tenant, whose keys are client addresses that only Redis knows (None)."""
    if tokens is None:
        return {ANONYMOUS: None}
    out: dict[str, set[str] | None] = {}
    for _, principal in tokens:
        out.setdefault(principal.name, set()).add(principal.limit_key)
    return out


def families(r: redis.Redis, quotas: Quotas, tenants: dict[str, set[str] | None]):
    made_batches = sorted(m.decode() for m in r.smembers(keys.BATCH_TENANTS))
    batch_use = {t: batch_store.usage(r, t) for t in {*tenants, *made_batches}}
    yield from _batch_families(quotas, {t: batch_use[t] for t in made_batches})
    limit = GaugeMetricFamily("inferq_tenant_quota_limit", "The bound of each quota, per tenant or limit key as "
                              "inferq_tenant_quota_used counts it (0: none)", labels=["quota"])
    for quota in QUOTAS:
        limit.add_metric([quota], quotas.limit(quota))
    yield limit
    used = GaugeMetricFamily("inferq_tenant_quota_used", USED_HELP, labels=["tenant", "quota"])
    for tenant, values in sorted(_use(r, quotas.jobs, tenants).items()):
        values["batches"], values["batch_bytes"] = batch_use[tenant]
        for quota in QUOTAS:
            used.add_metric([tenant, quota], values[quota])
    yield used


def _batch_families(quotas: Quotas, batch_use: dict[str, tuple[int, int]]):
    """The batch quotas alone, for every tenant that made a batch: what /metrics had before
    inferq_tenant_quota_used, kept for the dashboards and alerts that read it."""
    limit = GaugeMetricFamily("inferq_tenant_batch_quota_limit", "The bound each tenant's batches are held to "
                              "(0: none)", labels=["quota"])
    limit.add_metric(["batches"], quotas.batches)
    limit.add_metric(["bytes"], quotas.batch_bytes)
    used = GaugeMetricFamily("inferq_tenant_batch_quota_used", "A tenant's batches in flight, and the bytes of "
                             "its batch results and outputs in Redis", labels=["tenant", "quota"])
    for tenant, (batches, held) in batch_use.items():
        used.add_metric([tenant, "batches"], batches)
        used.add_metric([tenant, "bytes"], held)
    yield limit
    yield used


def _use(r: redis.Redis, limits: Limits, tenants: dict[str, set[str] | None]) -> dict[str, dict[str, float]]:
    """Queued, running, submit_burst (the fullest of each tenant's limit keys) and file_bytes, per tenant."""
    key_sets = {name: set(known or ()) for name, known in tenants.items()}
    if None in tenants.values():
        for limit_key, name in r.hgetall(keys.TENANTS).items():
            # Batch lines have keys of their own ("batch:<key>", api.batch_runner) that no limit bounds.
            if tenants.get(name.decode(), ()) is None and not limit_key.startswith(b"batch:"):
                key_sets[name.decode()].add(limit_key.decode())
    pairs = [(name, k) for name, ks in sorted(key_sets.items()) for k in sorted(ks)]
    pipe = r.pipeline(transaction=False)
    for _, k in pairs:
        pipe.scard(keys.limit_queued(k))
        pipe.scard(keys.limit_running(k))
        pipe.hmget(keys.limit_bucket(k), "tokens", "at")
    for name in key_sets:
        pipe.zrange(keys.tenant_files(name), 0, -1)
    answers = pipe.execute()
    now = clock.now_ms(r)
    out = {name: {"queued_jobs": 0, "running_jobs": 0, "submit_burst": 0.0, "file_bytes": 0} for name in key_sets}
    for i, (name, _) in enumerate(pairs):
        queued, running, bucket = answers[3 * i:3 * i + 3]
        use = out[name]
        use["queued_jobs"] = max(use["queued_jobs"], queued)
        use["running_jobs"] = max(use["running_jobs"], running)
        use["submit_burst"] = max(use["submit_burst"], _taken(limits, bucket, now))
    files = dict(zip(key_sets, answers[3 * len(pairs):]))
    pipe = r.pipeline(transaction=False)
    for ids in files.values():
        for file_id in ids:
            pipe.hget(keys.file(file_id.decode()), "bytes")
    sizes = iter(pipe.execute())
    for name, ids in files.items():
        # What the upload script counts against the bound: every file of the tenant's still there.
        out[name]["file_bytes"] = sum(int(size) for size in (next(sizes) for _ in ids) if size is not None)
    return out


def _taken(limits: Limits, bucket: list, now_ms: int) -> float:
    """Submits taken from a token bucket and not refilled yet, as admit.lua refills it."""
    if limits.submits_per_s <= 0 or bucket[0] is None:
        return 0.0  # no bound, or a bucket idle long enough to have expired: full
    burst = limits.bucket
    at = float(bucket[1]) if bucket[1] is not None else now_ms
    tokens = min(burst, float(bucket[0]) + max(0.0, now_ms - at) * limits.submits_per_s / 1000)
    return max(0.0, burst - tokens)
