"""Admission: a submitted operation becomes an RQ job in one atomic step.

One Lua call checks that a worker serves the model, that its workers can do
what the job needs (the model record's ``capabilities``: a grammar, logprobs,
embeddings), checks the queue bound, writes RQ's job hash, pushes the job on its RQ queue, logs and publishes the
``queued`` event (with the exact position), counts it and wakes an idle
worker. Two round trips (a check, then an enqueue) let 40 concurrent submits
through a bound of 10; one script cannot be interleaved, so the bound holds
exactly, and a submit costs one round trip.

The job hash is RQ's own: ``Job.create(...).to_dict()`` gives the fields RQ
would write, so rq-dashboard and RQ's registries read these jobs as theirs.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now

from queue_schema import keys, registry, stats
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.eventlog import DEFAULT_TTL_S
from queue_schema.operations import Operation

# The workers' entry points, named by string: the API never imports worker code,
# and workers run only the functions they know (see worker.jobs).
INFER_FUNC = "worker.infer_job.run_infer"
EMBED_FUNC = "worker.infer_job.run_embed"
JOB_FUNCS = {"infer": INFER_FUNC, "embed": EMBED_FUNC}
# RQ's own hard timeout is a backstop behind the worker's cooperative deadline.
RQ_TIMEOUT_GRACE_S = 60
_POSITION, _ETA = '"@@position@@"', '"@@eta@@"'

# KEYS: model, the model's 3 queues (priority order), job hash, events, channel, open-jobs index,
#       RQ's queues set, counters, wake list, the model's serving workers, the ETA average.
# ARGV: now (ms), bound, priority (1-3), job id, log ttl, event json, published prefix, worker ttl (s),
#       counter field, the capabilities the job needs (a JSON list), then the job hash's field/value pairs.
_ADMIT = """
local model = redis.call('GET', KEYS[1])
if not model then return {-1} end
local info = cjson.decode(model)
local needs = cjson.decode(ARGV[10])
if #needs > 0 then
  local have = {}
  if type(info['capabilities']) == 'table' then
    for _, c in ipairs(info['capabilities']) do have[c] = true end
  end
  for _, c in ipairs(needs) do
    if not have[c] then return {-4, c, info['backend'] or ''} end
  end
end
local serving = redis.call('ZCOUNT', KEYS[12], tonumber(ARGV[1]) / 1000 - tonumber(ARGV[8]), '+inf')
if serving == 0 then return {-3} end
local bound = math.min(tonumber(info['queue_depth']), tonumber(ARGV[2]))
local lengths, depth = {}, 0
for q = 2, 4 do
  lengths[q] = redis.call('LLEN', KEYS[q])
  depth = depth + lengths[q]
end
if depth >= bound then return {-2, bound} end
local prio = tonumber(ARGV[3])
local position = 0
for q = 2, prio + 1 do position = position + lengths[q] end
local eta = 'null'
local per_job = redis.call('HGET', KEYS[13], 'value')
if per_job then
  local slots = tonumber(info['slots'] or 1)
  eta = string.format('%.3f', (position + 1) * tonumber(per_job) / (serving * slots))
end
local id = ARGV[4]
local fields = {}
for i = 11, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[5], unpack(fields))
redis.call('RPUSH', KEYS[prio + 1], id)
redis.call('SADD', KEYS[9], KEYS[prio + 1])
local event = string.gsub((string.gsub(ARGV[6], '"@@position@@"', position)), '"@@eta@@"', eta)
redis.call('XADD', KEYS[6], '0-1', 'e', event)
redis.call('EXPIRE', KEYS[6], ARGV[5])
redis.call('PUBLISH', KEYS[7], ARGV[7] .. event)
redis.call('ZADD', KEYS[8], ARGV[1], id)
redis.call('HINCRBY', KEYS[10], ARGV[9], 1)
redis.call('RPUSH', KEYS[11], 1)
redis.call('LTRIM', KEYS[11], -64, -1)
return {1, position, eta}
"""


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Admitted:
    job_id: str
    queue: str
    position: int
    eta_s: float | None


class Admission:
    def __init__(self, client: redis.Redis, log_ttl_s: int = DEFAULT_TTL_S):
        self.redis = client
        self.log_ttl_s = log_ttl_s
        self._admit = client.register_script(_ADMIT)

    def admit(self, op: Operation, bound: int) -> Admitted:
        """Enqueue ``op``; MODEL_NOT_FOUND, UNSUPPORTED_FEATURE, MODEL_OFFLINE or QUEUE_FULL (with
        Retry-After) if it cannot be.

        The capability check is here, in the script that reads the model's record anyway, rather than
        in a read before it: no extra round trip, and the record it checks is the one admission uses.
        """
        job_id = new_job_id()
        queue = keys.queue_name(op.model, op.priority)
        submitted_ms = int(time.time() * 1000)
        event = json.dumps({"job_id": job_id, "seq": 0, "ts": submitted_ms, "type": "queued", "position": "@",
                            "queue": queue, "eta_s": "@"}, separators=(",", ":"))
        event = event.replace('"position":"@"', f'"position":{_POSITION}').replace('"eta_s":"@"', f'"eta_s":{_ETA}')
        fields = _job_hash(self.redis, job_id, queue, op, submitted_ms, self.log_ttl_s)
        flat = [v for kv in fields.items() for v in kv]
        result = self._admit(
            keys=[keys.model(op.model), *(keys.rq_queue(keys.queue_name(op.model, p)) for p in keys.PRIORITIES),
                  keys.rq_job(job_id), keys.job_events(job_id), keys.job_channel(job_id), keys.OPEN_JOBS,
                  keys.RQ_QUEUES, keys.COUNTERS, keys.model_wake(op.model), keys.model_workers(op.model),
                  keys.histogram(stats.RATE_KEY, op.model)],
            args=[submitted_ms, bound, keys.PRIORITIES.index(op.priority) + 1, job_id, self.log_ttl_s, event,
                  "0 queued ", registry.WORKER_TTL_S, f"submitted|{op.model}", json.dumps(op.needs()), *flat])
        if result[0] == -1:
            raise InferqError(ErrorCode.MODEL_NOT_FOUND, f"no worker serves a model named {op.model!r}; "
                              "see GET /v1/models")
        if result[0] == -4:
            feature, backend = (v.decode() if isinstance(v, bytes) else v for v in result[1:3])
            raise InferqError(ErrorCode.UNSUPPORTED_FEATURE, f"the workers of {op.model} ({backend or 'unknown'} "
                              f"backend) cannot do {_FEATURES.get(feature, feature)}; see the model's "
                              "capabilities in GET /v1/models")
        if result[0] == -3:
            raise InferqError(ErrorCode.MODEL_OFFLINE, f"no live worker serves {op.model!r} now (one did recently, "
                              "and may come back); retry later", retriable=True, headers={"Retry-After": "5"})
        if result[0] == -2:
            raise InferqError(ErrorCode.QUEUE_FULL, f"the queue for {op.model} is full ({result[1]} jobs); "
                              "retry later", retriable=True, headers={"Retry-After": "5"})
        eta = result[2].decode() if isinstance(result[2], bytes) else result[2]
        return Admitted(job_id, queue, int(result[1]), None if eta == "null" else float(eta))


_FEATURES = {"grammar": "structured output (response_format, json_schema, grammar)", "logprobs": "logprobs",
             "embeddings": "embeddings"}


def _job_hash(client: redis.Redis, job_id: str, queue: str, op: Operation, submitted_ms: int,
              ttl_s: int) -> dict:
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
        meta={"model": op.model, "priority": op.priority, "submitted_ms": submitted_ms,
              "expires_ms": submitted_ms + op.ttl_s * 1000 if op.ttl_s else None})
    job.enqueued_at = now()
    job._status = JobStatus.QUEUED
    return job.to_dict()
