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
import uuid
from dataclasses import dataclass

import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now

from queue_schema import keys
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle import clock, registry, stats
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

# KEYS: 1 model, 2 job hash, 3 events, 4 channel, 5 open-jobs index, 6 RQ's queues set, 7 counters,
#       8 wake list, 9 the model's serving workers, 10 the ETA average, 11 job info, 12 the job's queue,
#       13 its queue's ring, 14-15 the limit key's queued and running sets, 16 its bucket,
#       17 the idempotency key, 18 the tenant's job index, 19 every tenant's, 20 tenant counters,
#       21 tenants, then the rings of the interactive priorities in order.
# ARGV: 1 now (ms), 2 bound, 3 priority (1-based in keys.PRIORITIES), 4 job id, 5 log ttl, 6 event json,
#       7 published prefix, 8 worker ttl (s), 9 counter field, 10 the job's queue name, 11 tenant,
#       12 limit key, 13 submits/s, 14 burst, 15 max queued, 16 max running (0: off),
#       17 "<job id> <fingerprint>" or "", 18 its ttl (s), 19 index horizon (ms), 20 RQ's queue key prefix,
#       21 webhook url or "", 22 batch id or "", 23 the capabilities the job needs (a JSON list),
#       24 the job's score in the job indexes (submit time in µs: one client's jobs sort in the
#       order it sent them; in ms, a fifth of back-to-back submits shared one), then the job hash's
#       field/value pairs.
# Answers: {1, position, eta} admitted, {2, job id} replayed; refusals {-1} no such model,
#       {-8, capability, backend} unsupported feature, {-3} offline, {-4, wait ms} rate, {-5, n} queued,
#       {-6, n} running, {-2, bound} queue full, {-7, job id} idempotency key reused.
_ADMIT = """
local now, id, idem = tonumber(ARGV[1]), ARGV[4], ARGV[17]
if idem ~= '' then
  local prior = redis.call('GET', KEYS[17])
  if prior then
    local cut = string.find(prior, ' ', 1, true)
    local mine = string.sub(idem, string.find(idem, ' ', 1, true) + 1)
    if string.sub(prior, cut + 1) ~= mine then return {-7, string.sub(prior, 1, cut - 1)} end
    return {2, string.sub(prior, 1, cut - 1)}
  end
end
local model = redis.call('GET', KEYS[1])
if not model then return {-1} end
local info = cjson.decode(model)
local needs = cjson.decode(ARGV[23])
if #needs > 0 then
  local have = {}
  if type(info['capabilities']) == 'table' then
    for _, c in ipairs(info['capabilities']) do have[c] = true end
  end
  for _, c in ipairs(needs) do
    if not have[c] then return {-8, c, info['backend'] or ''} end
  end
end
local serving = redis.call('ZCOUNT', KEYS[9], now / 1000 - tonumber(ARGV[8]), '+inf')
if serving == 0 then return {-3} end
local rate, tokens = tonumber(ARGV[13]), 0
if rate > 0 then
  local burst = tonumber(ARGV[14])
  local bucket = redis.call('HMGET', KEYS[16], 'tokens', 'at')
  tokens = tonumber(bucket[1]) or burst
  tokens = math.min(burst, tokens + math.max(0, now - (tonumber(bucket[2]) or now)) * rate / 1000)
  if tokens < 1 then return {-4, math.ceil((1 - tokens) * 1000 / rate)} end
end
local max_queued, max_running = tonumber(ARGV[15]), tonumber(ARGV[16])
if max_queued > 0 and redis.call('SCARD', KEYS[14]) >= max_queued then return {-5, max_queued} end
if max_running > 0 and redis.call('SCARD', KEYS[15]) >= max_running then return {-6, max_running} end
local prio, member, prefix = tonumber(ARGV[3]), ARGV[10], ARGV[20]
local own = redis.call('LLEN', KEYS[12])
-- Waiting jobs per interactive priority, and of the other tenants' queues in the job's own ring.
local depth, ahead, others = 0, 0, 0
local function ring(key, mine)
  local total = 0
  for _, m in ipairs(redis.call('LRANGE', key, 0, -1)) do
    local n = redis.call('LLEN', prefix .. m)
    total = total + n
    if mine and m ~= member then others = others + math.min(n, own + 1) end
  end
  return total
end
for q = 22, #KEYS do
  local n = ring(KEYS[q], q - 21 == prio)
  depth = depth + n
  if q - 21 < prio then ahead = ahead + n end
end
if prio > #KEYS - 21 then
  ahead = depth
  ring(KEYS[13], true)
else
  local bound = math.min(tonumber(info['queue_depth']), tonumber(ARGV[2]))
  if depth >= bound then return {-2, bound} end
end
local position = ahead + own + others
local eta = 'null'
local per_job = redis.call('HGET', KEYS[10], 'value')
if per_job then
  local slots = tonumber(info['slots'] or 1)
  eta = string.format('%.3f', (position + 1) * tonumber(per_job) / (serving * slots))
end
local fields = {}
for i = 25, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[2], unpack(fields))
if redis.call('RPUSH', KEYS[12], id) == 1 then
  redis.call('LREM', KEYS[13], 0, member)
  redis.call('RPUSH', KEYS[13], member)
end
redis.call('SADD', KEYS[6], KEYS[12])
local tenant, limit_key = ARGV[11], ARGV[12]
redis.call('HSET', KEYS[11], 'tenant', tenant, 'limit', limit_key, 'submitted', now)
if ARGV[21] ~= '' then redis.call('HSET', KEYS[11], 'webhook', ARGV[21]) end
if ARGV[22] ~= '' then redis.call('HSET', KEYS[11], 'batch', ARGV[22]) end
redis.call('SADD', KEYS[14], id)
if rate > 0 then
  redis.call('HSET', KEYS[16], 'tokens', tostring(tokens - 1), 'at', now)
  redis.call('PEXPIRE', KEYS[16], math.ceil(tonumber(ARGV[14]) * 1000 / rate) + 1000)
end
local horizon, listed = tonumber(ARGV[19]), ARGV[24]
for k = 18, 19 do
  redis.call('ZADD', KEYS[k], listed, id)
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', string.format('%.0f', tonumber(listed) - horizon * 1000))
  redis.call('PEXPIRE', KEYS[k], horizon)
end
redis.call('HINCRBY', KEYS[20], 'submitted|' .. tenant, 1)
redis.call('HSET', KEYS[21], limit_key, tenant)
if idem ~= '' then redis.call('SET', KEYS[17], idem, 'EX', ARGV[18]) end
local event = string.gsub((string.gsub(ARGV[6], '"@@position@@"', position)), '"@@eta@@"', eta)
redis.call('XADD', KEYS[3], '0-1', 'e', event)
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('PUBLISH', KEYS[4], ARGV[7] .. event)
redis.call('ZADD', KEYS[5], now, id)
redis.call('HINCRBY', KEYS[7], ARGV[9], 1)
redis.call('RPUSH', KEYS[8], 1)
redis.call('LTRIM', KEYS[8], -64, -1)
return {1, position, eta}
"""

# KEYS: the idempotency key. ARGV: the job id it must still name.
_FORGET = """
local prior = redis.call('GET', KEYS[1])
if prior and string.sub(prior, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then return redis.call('DEL', KEYS[1]) end
return 0
"""


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
    def __init__(self, client: redis.Redis, settings: Settings = DEFAULTS):
        self.redis = client
        self.settings = settings
        self.log_ttl_s = settings.job_ttl_s
        self._admit = client.register_script(_ADMIT)
        self._forget = client.register_script(_FORGET)

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
        result = self._admit(
            keys=[keys.model(op.model), keys.rq_job(job_id), keys.job_events(job_id), keys.job_channel(job_id),
                  keys.OPEN_JOBS, keys.RQ_QUEUES, keys.COUNTERS, keys.model_wake(op.model),
                  keys.model_workers(op.model), keys.histogram(stats.RATE_KEY, op.model), keys.job_info(job_id),
                  keys.rq_queue(queue), keys.queue_ring(queue), keys.limit_queued(tenant.limit_key),
                  keys.limit_running(tenant.limit_key), keys.limit_bucket(tenant.limit_key), idem_key,
                  keys.tenant_jobs(tenant.name), keys.JOB_INDEX, keys.TENANT_COUNTERS, keys.TENANTS,
                  *(keys.queue_ring(keys.queue_name(op.model, p)) for p in keys.INTERACTIVE)],
            args=[submitted_ms, bound, keys.PRIORITIES.index(priority) + 1, job_id, self.log_ttl_s, event,
                  "0 queued ", registry.WORKER_TTL_S, f"submitted|{op.model}", queue, tenant.name,
                  tenant.limit_key, repr(float(limits.submits_per_s)), limits.bucket, limits.max_queued,
                  limits.max_running, f"{job_id} {idempotency.fingerprint}" if idempotency else "",
                  IDEMPOTENCY_TTL_S, 2 * self.log_ttl_s * 1000, keys.RQ_QUEUE_PREFIX,
                  op.webhook_url or "", batch or "", json.dumps(op.needs()), submitted_us, *flat])
        status = result[0]
        if status == 2:
            return Admitted(result[1].decode(), queue, 0, None, replayed=True)
        if status == 1:
            eta = result[2].decode() if isinstance(result[2], bytes) else result[2]
            return Admitted(job_id, queue, int(result[1]), None if eta == "null" else float(eta))
        raise _refusal(op, tenant, status, result[1:], self.settings.retry_after.busy_s)

    def forget(self, tenant: Tenant, idempotency: Idempotency, job_id: str) -> bool:
        """Drop the key if it still names ``job_id`` (a request that made several jobs and then had
        one refused cancels the others: a retry with its key must make new ones)."""
        return bool(self._forget(keys=[keys.idempotency(tenant.name, idempotency.digest)], args=[job_id]))


_FEATURES = {"grammar": "structured output (response_format, json_schema, grammar)", "logprobs": "logprobs",
             "embeddings": "embeddings"}


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
