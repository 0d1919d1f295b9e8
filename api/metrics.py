"""``GET /metrics``: Prometheus text, collected from Redis at scrape time.

Workers and API processes write counters and histogram buckets to Redis
(``queue_schema.lifecycle.stats``); queue depths and worker states are read live. So
every gunicorn process answers the same, with no multiprocess directory. What shows the
Redis primary's limits coming is in ``api.operator_metrics``, each tenant's quota use in
``api.quota_metrics``.
"""
from __future__ import annotations

import redis
from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from rq.job import Job
from rq.serializers import JSONSerializer

from api import operator_metrics, quota_metrics
from api.extensions import resources
from api.jobs import tenant_limits
from queue_schema import keys
from queue_schema.lifecycle import clock, registry, stats, tenants
from queue_schema.lifecycle import views as jobs

bp = Blueprint("metrics", __name__)
_HELP = {
    "submitted": "Jobs accepted by the API", "finished": "Jobs that ended normally",
    "failed": "Jobs that ended with an error event", "cancelled": "Jobs cancelled by a client",
    "tokens": "Tokens generated (inferq_redis_cpu_seconds_total over it is the queue's Redis cost per token)",
    "stuck_steps": "Decode steps that ran past the worker's bound (their jobs were handed on)",
}
_NAMES = {"tokens": "inferq_tokens_generated", "stuck_steps": "inferq_worker_stuck_steps"}


class RedisCollector:
    def __init__(self, client: redis.Redis, quotas: quota_metrics.Quotas | None = None,
                 configured: dict[str, set[str] | None] | None = None, cost: operator_metrics.RedisCost | None = None,
                 headroom: float = 0.0):
        self.redis = client
        self.quotas = quotas or quota_metrics.Quotas()
        # The tenants whose quotas are shown, and their limit keys (quota_metrics.configured_tenants).
        self.configured = configured if configured is not None else quota_metrics.configured_tenants(None)
        self.cost, self.headroom = cost, headroom

    def collect(self):
        r = self.redis
        counters = stats.read_counters(r)
        for name in stats.COUNTERS:
            metric = _NAMES.get(name, f"inferq_jobs_{name}")
            family = CounterMetricFamily(metric, _HELP[name], labels=["model"])
            for model, value in sorted(counters.get(name, {}).items()):
                family.add_metric([model], value)
            yield family
        models = sorted(m.name for m in registry.known_models(r))
        depth = GaugeMetricFamily("inferq_queue_depth", "Jobs waiting", labels=["model", "priority"])
        oldest = GaugeMetricFamily("inferq_queue_oldest_job_age_seconds", "Age of the oldest waiting job",
                                   labels=["model", "priority"])
        for model in models:
            snap = jobs.snapshot(r, model)
            for priority in keys.PRIORITIES:
                depth.add_metric([model, priority], snap.lengths[priority])
                # Each tenant's queue is FIFO: the oldest job is at the head of one of them.
                oldest.add_metric([model, priority], max((_oldest_age(r, name) for name, n in
                                                          snap.queues[priority].items() if n), default=0.0))
        yield depth
        yield oldest
        yield from _tenant_families(r)
        yield from quota_metrics.families(r, self.quotas, self.configured)
        yield from operator_metrics.redis_families(r, sum(counters.get("tokens", {}).values()), self.cost,
                                                   self.headroom)
        yield from operator_metrics.webhook_families(r)
        for name, help_text in (("ttft_seconds", "Time from a job's start to its first token"),
                                ("queue_wait_seconds", "Time jobs waited in the queue")):
            family = HistogramMetricFamily(f"inferq_{name}", help_text, labels=["model"])
            for model in models:
                hist = stats.read_histogram(r, name, model)
                if hist:
                    family.add_metric([model], hist[0], hist[1])
            yield family
        workers = registry.live_workers(r)
        by_state = GaugeMetricFamily("inferq_workers", "Live workers", labels=["model", "state"])
        running = GaugeMetricFamily("inferq_jobs_running", "Jobs being decoded", labels=["model"])
        rate = GaugeMetricFamily("inferq_worker_tokens_per_second", "Decode rate of the worker's last job",
                                 labels=["worker", "model"])
        vram = GaugeMetricFamily("inferq_worker_vram_bytes", "GPU memory the worker's model uses",
                                 labels=["worker", "model"])
        slots = GaugeMetricFamily("inferq_worker_slots", "Jobs the worker can decode at once",
                                  labels=["worker", "model"])
        busy = GaugeMetricFamily("inferq_worker_busy_slots", "Jobs the worker is decoding now",
                                 labels=["worker", "model"])
        batch = GaugeMetricFamily("inferq_worker_batch_size", "Sequences per decode call, recent average",
                                  labels=["worker", "model"])
        tally: dict[tuple[str, str], int] = {}
        jobs_running: dict[str, int] = {}
        for w in workers:
            tally[(w.model, w.state)] = tally.get((w.model, w.state), 0) + 1
            jobs_running[w.model] = jobs_running.get(w.model, 0) + len(w.jobs)
            if w.last_tokens_per_sec is not None:
                rate.add_metric([w.id, w.model], w.last_tokens_per_sec)
            vram.add_metric([w.id, w.model], w.vram_bytes)
            slots.add_metric([w.id, w.model], w.slots)
            busy.add_metric([w.id, w.model], len(w.jobs))
            batch.add_metric([w.id, w.model], w.batch_size)
        for (model, state), n in sorted(tally.items()):
            by_state.add_metric([model, state], n)
        for model in models:
            running.add_metric([model], jobs_running.get(model, 0))
        yield from (by_state, running, rate, vram, slots, busy, batch)


def _tenant_families(r: redis.Redis):
    """Jobs by tenant: counted by the admission and terminal-append scripts; queued and running
    are the sizes of the sets those scripts keep (queue_schema.lifecycle.tenants)."""
    counters = tenants.read_counters(r)
    for name in ("submitted", "finished", "failed", "cancelled"):
        family = CounterMetricFamily(f"inferq_tenant_jobs_{name}", f"{_HELP[name]}, by tenant", labels=["tenant"])
        for tenant, value in sorted(counters.get(name, {}).items()):
            family.add_metric([tenant], value)
        yield family
    queued = GaugeMetricFamily("inferq_tenant_jobs_queued", "Jobs waiting, by tenant", labels=["tenant"])
    running = GaugeMetricFamily("inferq_tenant_jobs_running", "Jobs leased to a worker, by tenant",
                                labels=["tenant"])
    for tenant, (q, n) in sorted(tenants.counts(r).items()):
        queued.add_metric([tenant], q)
        running.add_metric([tenant], n)
    yield queued
    yield running


def _oldest_age(r: redis.Redis, queue_name: str) -> float:
    head = r.lindex(keys.rq_queue(queue_name), 0)
    if head is None:
        return 0.0
    try:
        job = Job.fetch(head.decode(), connection=r, serializer=JSONSerializer)
    except Exception:  # expired or foreign entry: no age to report
        return 0.0
    submitted = job.meta.get("submitted_ms")
    return max(0.0, clock.now_s(r) - submitted / 1000) if submitted else 0.0


@bp.get("/metrics")
def metrics():
    reg = CollectorRegistry(auto_describe=False)
    app = current_app
    # The process's own window of samples outlives the request; the registry is made per scrape.
    cost = app.extensions.setdefault("inferq_redis_cost", operator_metrics.RedisCost())
    reg.register(RedisCollector(resources().redis, quota_metrics.Quotas.from_config(app.config, tenant_limits()),
                                quota_metrics.configured_tenants(app.extensions["inferq_auth"].tokens), cost,
                                float(app.config["REDIS_HEADROOM"])))
    return Response(generate_latest(reg), mimetype=CONTENT_TYPE_LATEST)
