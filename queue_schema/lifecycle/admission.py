"""Admission: a submitted operation becomes an RQ job in one atomic step.

One Lua call returns the job an ``Idempotency-Key`` already gave, or checks
that a worker serves the model, that its workers can do what the job needs
(the model record's ``capabilities``: a grammar, logprobs, embeddings), the
tenant's limits (a token bucket of submits per second, its queued and running
jobs) and the queue bound, then
writes RQ's job hash, pushes the job on its tenant's RQ queue (and the
tenant on the queue's ring, for fair share), logs and publishes the
``queued`` event (with its position), indexes it for its tenant, counts it
and wakes an idle worker. Two round trips (a check, then an enqueue) let 40
concurrent submits through a bound of 10; one script cannot be interleaved,
so every bound holds exactly and two requests with one idempotency key get
one job. Both operations (``infer`` and ``embed``) come through this one
script; they differ only in the job function and what they need.

The job hash is RQ's own: ``Job.create(...).to_dict()`` gives the fields RQ
would write, so rq-dashboard and RQ's registries read these jobs as theirs.
What inferq's own scripts need about a job (its tenant, limit key, webhook,
batch) is in a small hash beside it (``keys.job_info``).

Fair share: each tenant has its own RQ queue under the model's queue for a
priority (``inferq.<model>.<priority>@<tenant>``), and a ring lists the
queues with jobs waiting; the lease script takes from them in turn
(queue_schema.lifecycle.leases). So the position in the ``queued`` event is an
estimate: jobs of higher priorities, the jobs ahead in the tenant's own
queue, and as many of each other tenant's as the ring will take before it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass

import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now

from queue_schema import keys
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle import clock, registry, scripts, stats
from queue_schema.lifecycle.tenants import NO_LIMITS, NOBODY, Limits, Tenant
from queue_schema.operations import Operation
from queue_schema.settings import DEFAULTS, Settings

# The workers' entry points, named by string: the API never imports worker code,
# and workers run only the functions they know (see worker.jobs).
INFER_FUNC = "worker.infer_job.run_infer"
EMBED_FUNC = "worker.infer_job.run_embed"
JOB_FUNCS = {"infer": INFER_FUNC, "embed": EMBED_FUNC}
# RQ's own hard timeout is a backstop behind the worker's cooperative deadline.
RQ_TIMEOUT_GRACE_S = 60
IDEMPOTENCY_TTL_S = 24 * 3600
_POSITION, _ETA = '"@@position@@"', '"@@eta@@"'

_ADMIT, _FORGET = scripts.load("admit"), scripts.load("forget")

log = logging.getLogger(__name__)


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Idempotency:
    """A client's Idempotency-Key (kept as a digest) and a fingerprint of the request it came with."""

    digest: str
    fingerprint: str

    @classmethod
    def of(cls, key: str, request: str | bytes) -> "Idempotency":
        raw = request.encode() if isinstance(request, str) else request
        return cls(hashlib.sha256(key.encode()).hexdigest()[:32], hashlib.sha256(raw).hexdigest()[:16])

    def choice(self, index: int) -> "Idempotency":
        """The key of choice ``index`` of a request that makes several jobs (the OpenAI routes' ``n``):
        choice 0 keeps the key itself, choice i gets one derived from it as if ``#i`` followed it after
        a byte no header may hold (so a key a client sends is never another key's choice). All keep
        the request's fingerprint: the key with another ``n`` is refused at choice 0."""
        if index == 0:
            return self
        return Idempotency(hashlib.sha256(f"{self.digest}\n#{index}".encode()).hexdigest()[:32], self.fingerprint)


@dataclass(frozen=True)
class Admitted:
    job_id: str
    queue: str
    position: int
    eta_s: float | None
    replayed: bool = False  # an earlier request with the same idempotency key made this job


class Admission:
    def __init__(self, client: redis.Redis, settings: Settings = DEFAULTS, eventlog=None):
        """``eventlog``: the job logs' (an EventLog), where they live on a store of their own: the ``queued``
        event is written there after the script, which leaves it in RQ's job hash for a take that comes first."""
        self.redis = client
        self.eventlog = eventlog if eventlog is not None and eventlog.apart else None
        self.settings = settings
        self.log_ttl_s = settings.job_ttl_s

    def admit(self, op: Operation, bound: int, tenant: Tenant = NOBODY, limits: Limits = NO_LIMITS,
              idempotency: Idempotency | None = None, priority: str | None = None,
              batch: str | None = None) -> Admitted:
        """Enqueue ``op`` for ``tenant``, or return the job ``idempotency`` already gave.

        ``priority`` overrides the operation's (batch lines run at ``batch``).
        Raises MODEL_NOT_FOUND, UNSUPPORTED_FEATURE, MODEL_OFFLINE, QUEUE_FULL,
        RATE_LIMITED, TOO_MANY_QUEUED, TOO_MANY_RUNNING (with Retry-After) or
        IDEMPOTENCY_KEY_REUSED.

        The capability check is in the script that reads the model's record anyway, rather than in
        a read before it: no extra round trip, and the record it checks is the one admission uses.
        """
        job_id = new_job_id()
        priority = priority or op.priority
        queue = keys.queue_name(op.model, priority, tenant.queue_suffix)
        submitted_us = clock.of(self.redis).now_us()  # the fleet's clock: workers compare it with theirs
        submitted_ms = submitted_us // 1000
        event = json.dumps({"job_id": job_id, "seq": 0, "ts": submitted_ms, "type": "queued", "position": "@",
                            "queue": queue, "eta_s": "@"}, separators=(",", ":"))
        event = event.replace('"position":"@"', f'"position":{_POSITION}').replace('"eta_s":"@"', f'"eta_s":{_ETA}')
        fields = _job_hash(self.redis, job_id, queue, op, submitted_ms, self.log_ttl_s, priority, tenant.name)
        flat = [v for kv in fields.items() for v in kv]
        idem_key = keys.idempotency(tenant.name, idempotency.digest) if idempotency else keys.idempotency(
            tenant.name, "-")
        result = _ADMIT(self.redis, {
            "model": keys.model(op.model), "job": keys.rq_job(job_id), "events": keys.job_events(job_id),
            "channel": keys.job_channel(job_id), "open_jobs": keys.OPEN_JOBS, "rq_queues": keys.RQ_QUEUES,
            "counters": keys.COUNTERS, "wake": keys.model_wake(op.model), "serving": keys.model_workers(op.model),
            "eta": keys.histogram(stats.RATE_KEY, op.model), "info": keys.job_info(job_id),
            "queue": keys.rq_queue(queue), "ring": keys.queue_ring(queue), "queued": keys.limit_queued(tenant.limit_key),
            "running": keys.limit_running(tenant.limit_key), "bucket": keys.limit_bucket(tenant.limit_key),
            "idem": idem_key, "tenant_jobs": keys.tenant_jobs(tenant.name), "all_jobs": keys.JOB_INDEX,
            "tenant_counters": keys.TENANT_COUNTERS, "tenants": keys.TENANTS,
        }, {
            "now": submitted_ms, "bound": bound, "priority": keys.PRIORITIES.index(priority) + 1, "id": job_id,
            "ttl": self.log_ttl_s, "event": event, "worker_ttl": registry.WORKER_TTL_S, "model": op.model,
            "queue_name": queue, "tenant": tenant.name, "limit_key": tenant.limit_key,
            "rate": repr(float(limits.submits_per_s)), "burst": limits.bucket, "max_queued": limits.max_queued,
            "max_running": limits.max_running,
            "idem": f"{job_id} {idempotency.fingerprint}" if idempotency else "", "idem_ttl": IDEMPOTENCY_TTL_S,
            "horizon": 2 * self.log_ttl_s * 1000, "webhook": op.webhook_url or "", "batch": batch or "",
            "needs": json.dumps(op.needs()), "listed": submitted_us, "apart": int(self.eventlog is not None),
        }, [keys.queue_ring(keys.queue_name(op.model, p)) for p in keys.INTERACTIVE], flat)
        status = result[0]
        if status == 2:
            return Admitted(result[1].decode(), queue, 0, None, replayed=True)
        if status == 1:
            if self.eventlog is not None:
                try:
                    self.eventlog.write_queued(job_id, result[3])
                except redis.RedisError as exc:
                    # The job is admitted: its first take, or the reaper's sweep, writes the event from RQ's
                    # job hash. Failing the request would have its client submit it twice.
                    log.warning("job %s: its queued event waits for the events store (%s)", job_id, exc)
            eta = result[2].decode() if isinstance(result[2], bytes) else result[2]
            return Admitted(job_id, queue, int(result[1]), None if eta == "null" else float(eta))
        raise _refusal(op, tenant, status, result[1:], self.settings.retry_after.busy_s)

    def forget(self, tenant: Tenant, idempotency: Idempotency, job_id: str) -> bool:
        """Drop the key if it still names ``job_id`` (a request that made several jobs and then had
        one refused cancels the others: a retry with its key must make new ones)."""
        return bool(_FORGET(self.redis, {"idem": keys.idempotency(tenant.name, idempotency.digest)}, {"job": job_id}))


_FEATURES = {"grammar": "structured output (response_format, json_schema, grammar, a forced tool call)",
             "logprobs": "logprobs", "embeddings": "embeddings"}


def _refusal(op: Operation, tenant: Tenant, status: int, rest: list, busy_s: float) -> InferqError:
    detail = rest[0] if rest else None
    if status == -1:
        return InferqError(ErrorCode.MODEL_NOT_FOUND, f"no worker serves a model named {op.model!r}; "
                           "see GET /v1/models")
    if status == -8:
        feature, backend = (v.decode() if isinstance(v, bytes) else v for v in rest[:2])
        return InferqError(ErrorCode.UNSUPPORTED_FEATURE, f"the workers of {op.model} ({backend or 'unknown'} "
                           f"backend) cannot do {_FEATURES.get(feature, feature)}; see the model's "
                           "capabilities in GET /v1/models")
    if status == -3:
        return InferqError(ErrorCode.MODEL_OFFLINE, f"no live worker serves {op.model!r} now (one did recently, "
                           "and may come back); retry later", retriable=True, retry_after_s=busy_s)
    if status == -2:
        return InferqError(ErrorCode.QUEUE_FULL, f"the queue for {op.model} is full ({detail} jobs); "
                           "retry later", retriable=True, retry_after_s=busy_s)
    if status == -4:
        wait_s = max(1, -(-int(detail) // 1000))
        return InferqError(ErrorCode.RATE_LIMITED, f"tenant {tenant.name!r} submits faster than its limit; "
                           f"retry in {wait_s} s", retriable=True, retry_after_s=wait_s)
    if status == -5:
        return InferqError(ErrorCode.TOO_MANY_QUEUED, f"tenant {tenant.name!r} has {detail} jobs queued, its "
                           "limit; retry when some have started", retriable=True, retry_after_s=busy_s)
    if status == -6:
        return InferqError(ErrorCode.TOO_MANY_RUNNING, f"tenant {tenant.name!r} has {detail} jobs running, its "
                           "limit; retry when some have ended", retriable=True, retry_after_s=busy_s)
    if status == -7:
        return InferqError(ErrorCode.IDEMPOTENCY_KEY_REUSED, f"this Idempotency-Key was used within 24 h for a "
                           f"different request (job {detail.decode()}); use a new key for a new request")
    return InferqError(ErrorCode.INTERNAL, f"admission answered {status}")


def _job_hash(client: redis.Redis, job_id: str, queue: str, op: Operation, submitted_ms: int,
              ttl_s: int, priority: str, tenant: str) -> dict:
    """The fields RQ itself would write for this job (Job.create + what Queue.enqueue_job adds)."""
    if op.operation == "infer":
        description = f"infer {op.model} max_tokens={op.max_tokens}"  # never the prompt
    else:
        description = f"{op.operation} {op.model} inputs={len(op.inputs)}"
    job = Job.create(
        JOB_FUNCS[op.operation], kwargs={"payload": op.model_dump(mode="json", exclude_none=True)}, id=job_id,
        connection=client, serializer=JSONSerializer, timeout=op.timeout_s + RQ_TIMEOUT_GRACE_S,
        result_ttl=ttl_s, failure_ttl=ttl_s, origin=queue,
        description=description,
        meta={"model": op.model, "priority": priority, "tenant": tenant, "submitted_ms": submitted_ms,
              "expires_ms": submitted_ms + op.ttl_s * 1000 if op.ttl_s else None})
    job.enqueued_at = now()
    job._status = JobStatus.QUEUED
    return job.to_dict()
