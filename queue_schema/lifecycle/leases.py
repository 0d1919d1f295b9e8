"""Job leases: which one worker runs a job, taken atomically as the job leaves its queue.

A worker takes jobs with one Lua call that pops them from the model's queues
in priority order and, in the same call, writes each job's lease (owner =
the worker's id), adds it to the leases index and marks RQ's job hash
started. There is no instant at which a job is in no queue and under no
lease, so ``kill -9`` at any point loses nothing: a lease whose owner stops
renewing it is found by the reaper (``queue_schema.lifecycle.reaper``), whichever
inferq process runs it.

A lease has no Redis expiry. The owner bumps ``renewals`` every second; the
reaper declares a lease lost only after watching it stand still for a while
on its own clock, with Redis answering all along. A Redis freeze therefore
stops the owner and the watcher alike and expires nothing (a TTL would have
lapsed during the freeze and handed a live job to someone else), while a
dead or cut-off owner loses its jobs. Taking a lease over is a
compare-and-set on (owner, renewals), and every event write checks the owner
(``queue_schema.lifecycle.eventlog``), so a worker that comes back after losing its
lease is refused and stops the job.

Fair share: within a priority, each tenant's jobs wait on the tenant's own
RQ queue, and the model queue's ring lists the queues that have jobs; each
job taken moves the ring's head to its tail (LMOVE, O(1)), so tenants take
turns whatever their backlog, and a queue that runs empty leaves the ring
(LREM of the tail just moved, O(1)). In the same step the job moves from its
limit key's queued set to its running set (queue_schema.lifecycle.tenants).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from queue_schema import keys

# KEYS: leases index, then per priority (highest first): its ring, then the model's own queue.
# ARGV: owner, RQ worker name, now (ms), now (RQ's date format), how many, then the key affixes.
_ACQUIRE = """
local owner, worker, now_ms, now_rq, want = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local job_pre, ev_pre, ev_post, lease_pre, lease_post = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local queue_pre, info_pre, info_post = ARGV[11], ARGV[12], ARGV[13]
local queued_pre, queued_post, running_pre, running_post = ARGV[14], ARGV[15], ARGV[16], ARGV[17]
local out = {}
local function take(id, queue)
  local job = job_pre .. id
  if redis.call('HGET', job, 'status') ~= 'queued' then return end
  local last = redis.call('XREVRANGE', ev_pre .. id .. ev_post, '+', '-', 'COUNT', 1)[1]
  local next_seq, closed = 0, 0
  if last then
    next_seq = tonumber(string.match(last[1], '^(%d+)')) + 1
    if #last[2] > 2 then closed = 1 end
  end
  if closed == 0 then
    redis.call('HSET', lease_pre .. id .. lease_post, 'owner', owner, 'renewals', 0, 'taken_ms', now_ms)
    redis.call('ZADD', KEYS[1], now_ms, id)
    redis.call('HSET', job, 'status', 'started', 'worker_name', worker, 'started_at', now_rq,
               'last_heartbeat', now_rq)
    redis.call('PERSIST', job)
    local limit = redis.call('HGET', info_pre .. id .. info_post, 'limit')
    if limit then
      redis.call('SREM', queued_pre .. limit .. queued_post, id)
      redis.call('SADD', running_pre .. limit .. running_post, id)
    end
  end
  out[#out + 1] = {id, queue, next_seq, closed, redis.call('HGETALL', job)}
end
for k = 2, #KEYS, 2 do
  local ring, own = KEYS[k], KEYS[k + 1]
  -- Fair share: the ring's head goes to its tail and gives one job; an empty queue leaves the ring.
  while #out < want do
    local member = redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
    if not member then break end
    local queue = queue_pre .. member
    local id = redis.call('LPOP', queue)
    if not id or redis.call('LLEN', queue) == 0 then redis.call('LREM', ring, -1, member) end
    if id then take(id, queue) end
  end
  -- Jobs pushed on the model's own queue some other way (RQ's API) are in no ring.
  while #out < want do
    local id = redis.call('LPOP', own)
    if not id then break end
    take(id, own)
  end
  if #out >= want then break end
end
return out
"""
_RENEW = """
local out = {}
for i, lease in ipairs(KEYS) do
  if redis.call('HGET', lease, 'owner') == ARGV[1] then
    redis.call('HINCRBY', lease, 'renewals', 1)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
_OBSERVE = """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)) do
  local lease = redis.call('HMGET', ARGV[1] .. id .. ARGV[2], 'owner', 'renewals')
  out[#out + 1] = {id, lease[1] or '', lease[2] or ''}
end
return out
"""
_CLAIM = """
local lease = redis.call('HMGET', KEYS[1], 'owner', 'renewals')
if (lease[1] or '') ~= ARGV[1] or (lease[2] or '') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[3], 'renewals', 0)
return 1
"""
# KEYS: lease, leases index, queue, RQ job hash, wake list, the queue's ring, job info.
# ARGV: owner, job id, queue name, then the affixes of the limit sets.
# KEYS: lease. ARGV: owner, new owner.
_TAKE_OVER = """
if (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'renewals', 0)
return 1
"""
_REQUEUE = """
if (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[4], 'status', 'queued', 'worker_name', '')
if redis.call('LPUSH', KEYS[3], ARGV[2]) == 1 then
  redis.call('LREM', KEYS[6], 0, ARGV[3])
  redis.call('LPUSH', KEYS[6], ARGV[3])
end
local limit = redis.call('HGET', KEYS[7], 'limit')
if limit then
  redis.call('SREM', ARGV[6] .. limit .. ARGV[7], ARGV[2])
  redis.call('SADD', ARGV[4] .. limit .. ARGV[5], ARGV[2])
end
redis.call('RPUSH', KEYS[5], 1)
redis.call('LTRIM', KEYS[5], -64, -1)
return 1
"""
_RELEASE = """
if (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""


_LIMIT_AFFIXES = [*keys.split(keys.limit_queued), *keys.split(keys.limit_running)]


@dataclass
class Acquired:
    """A job taken from a queue: under this worker's lease unless its log had already ended."""

    job_id: str
    queue_key: str
    next_seq: int  # the seq its next event gets
    closed: bool  # its log already ended (cancelled while queued, say): not leased, nothing to run
    fields: dict[bytes, bytes]  # RQ's job hash, as Job.restore takes it


@dataclass(frozen=True)
class LeaseView:
    job_id: str
    owner: str
    renewals: str


class Leases:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._observe = client.register_script(_OBSERVE)
        self._claim = client.register_script(_CLAIM)
        self._take_over = client.register_script(_TAKE_OVER)
        self._requeue = client.register_script(_REQUEUE)
        self._release = client.register_script(_RELEASE)
        self._affixes = [keys.RQ_JOB_PREFIX, *keys.split(keys.job_events), *keys.split(keys.job_lease),
                         keys.RQ_QUEUE_PREFIX, *keys.split(keys.job_info), *_LIMIT_AFFIXES]

    def acquire(self, owner: str, rq_worker: str, queue_names: Sequence[str], want: int, now_ms: int,
                now_rq: str) -> list[Acquired]:
        """Take up to ``want`` jobs under ``owner``'s lease from the model queues ``queue_names``
        (highest priority first), the tenants' queues under each taken in turn."""
        queue_keys = [k for q in queue_names for k in (keys.queue_ring(q), keys.rq_queue(q))]
        rows = self._acquire(keys=[keys.LEASES, *queue_keys],
                             args=[owner, rq_worker, now_ms, now_rq, want, *self._affixes])
        out = []
        for job_id, queue_key, next_seq, closed, flat in rows:
            fields = dict(zip(flat[::2], flat[1::2]))
            out.append(Acquired(job_id.decode(), queue_key.decode(), int(next_seq), bool(closed), fields))
        return out

    def renew(self, owner: str, job_ids: Sequence[str]) -> list[str]:
        """Renew ``owner``'s leases; the ids among ``job_ids`` it no longer holds."""
        if not job_ids:
            return []
        held = self._renew(keys=[keys.job_lease(j) for j in job_ids], args=[owner])
        return [j for j, ok in zip(job_ids, held) if not ok]

    def observe(self, limit: int = 100_000) -> list[LeaseView]:
        """Every lease's owner and renewal count, in one call."""
        rows = self._observe(keys=[keys.LEASES], args=[*keys.split(keys.job_lease), limit])
        return [LeaseView(j.decode(), o.decode(), r.decode()) for j, o, r in rows]

    def claim(self, seen: LeaseView, new_owner: str) -> bool:
        """Take the lease over if it still stands exactly as ``seen``."""
        return bool(self._claim(keys=[keys.job_lease(seen.job_id)], args=[seen.owner, seen.renewals, new_owner]))

    def take_over(self, job_id: str, owner: str, new_owner: str) -> bool:
        """Move ``owner``'s lease to ``new_owner`` (a worker handing its own job to its reaper: its engine
        thread's later writes are then fenced)."""
        return bool(self._take_over(keys=[keys.job_lease(job_id)], args=[owner, new_owner]))

    def requeue(self, job_id: str, owner: str, queue_name: str, model: str) -> bool:
        """Give the job back, to the front of its queue (and its queue to the front of the ring),
        if ``owner`` holds it."""
        return bool(self._requeue(keys=[keys.job_lease(job_id), keys.LEASES, keys.rq_queue(queue_name),
                                        keys.rq_job(job_id), keys.model_wake(model), keys.queue_ring(queue_name),
                                        keys.job_info(job_id)],
                                  args=[owner, job_id, queue_name, *_LIMIT_AFFIXES]))

    def release(self, job_id: str, owner: str) -> bool:
        return bool(self._release(keys=[keys.job_lease(job_id), keys.LEASES], args=[owner, job_id]))

    def owners(self, job_ids: Iterable[str]) -> dict[str, str]:
        pipe = self.redis.pipeline(transaction=False)
        ids = list(job_ids)
        for j in ids:
            pipe.hget(keys.job_lease(j), "owner")
        return {j: (o or b"").decode() for j, o in zip(ids, pipe.execute())}


# KEYS: lease, queue, RQ job hash. ARGV: job id.
_CANCEL_QUEUED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('LREM', KEYS[2], 0, ARGV[1]) == 0 then return -1 end
redis.call('HSET', KEYS[3], 'status', 'canceled')
return 1
"""
# KEYS: lease, leases index. ARGV: owner, job id, now (ms).
_ADOPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'renewals', 0, 'taken_ms', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return 1
"""


def cancel_queued(client: redis.Redis, job_id: str, queue_name: str) -> int:
    """Take a queued job out of its queue if no worker holds it: 1 done, 0 a worker runs it,
    -1 it is in no queue (a worker is taking it, or it ended)."""
    return int(client.eval(_CANCEL_QUEUED, 3, keys.job_lease(job_id), keys.rq_queue(queue_name),
                           keys.rq_job(job_id), job_id))


def adopt(client: redis.Redis, job_id: str, owner: str, now_ms: int) -> bool:
    """Lease a job that shows as running but has no lease (one lost in a Redis restart), to close it."""
    return bool(client.eval(_ADOPT, 2, keys.job_lease(job_id), keys.LEASES, owner, job_id, now_ms))
