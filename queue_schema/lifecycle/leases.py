"""Job leases: which one worker runs a job, taken atomically as the job leaves its queue.

A worker takes jobs with one Lua call that pops them from the model's queues
in priority order and, in the same call, writes each job's lease (owner =
the worker's id), adds it to the leases index and marks RQ's job hash
started. There is no instant at which a job is in no queue and under no
lease, so ``kill -9`` at any point loses nothing: a lease whose owner stops
renewing it is found by the reaper (``queue_schema.lifecycle.reaper``), whichever
inferq process runs it.

A lease's owner is ``<worker>#<generation>``: the generation grows every time
the job is taken (dequeued, taken over by a reaper, handed to a worker's own
reaper, adopted), so each take is a writer of its own. Without it the fence
compared worker ids only: a worker whose heartbeat stalled past the reaper's
patience, and whose intake took the requeued job back, ran two copies that
both passed it.

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

Where the logs live on a store of their own (INFERQ_EVENTS_URL), a take is
two steps: the queue's script moves the lease and counts the generation, then
the log is fenced at it (``EventLog.fence``). Until the fence is in, the take
before may still write; a take whose fence finds a later one's is stale, and
gives up (the job is that later take's).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from queue_schema import keys
from queue_schema.lifecycle import scripts

_ACQUIRE, _RENEW, _OBSERVE = scripts.load("lease_acquire"), scripts.load("lease_renew"), scripts.load("lease_observe")
_CLAIM, _TAKE_OVER, _REQUEUE = scripts.load("lease_claim"), scripts.load("lease_take_over"), scripts.load("lease_requeue")
_CANCEL_QUEUED, _ADOPT = scripts.load("cancel_queued"), scripts.load("lease_adopt")


@dataclass
class Acquired:
    """A job taken from a queue: under this worker's lease unless its log had already ended."""

    job_id: str
    queue_key: str
    next_seq: int  # the seq its next event gets
    closed: bool  # its log already ended (cancelled while queued, say): not leased, nothing to run
    owner: str  # the lease owner it is written as ("<worker>#<generation>"; "" if closed)
    fields: dict[bytes, bytes]  # RQ's job hash, as Job.restore takes it


def worker_of(owner: str) -> str:
    """The process behind a lease owner string (its generation cut off)."""
    return owner.rpartition("#")[0] if "#" in owner else owner


def generation(owner: str) -> int:
    """Which take of its job a lease owner string is (0 for none)."""
    head, _, gen = owner.rpartition("#")
    return int(gen) if head and gen.isdigit() else 0


@dataclass(frozen=True)
class LeaseView:
    job_id: str
    owner: str
    renewals: str


class Leases:
    def __init__(self, client: redis.Redis, eventlog=None):
        """``eventlog``: the job logs' (an EventLog), where they live on a store of their own."""
        self.redis = client
        self.eventlog = eventlog if eventlog is not None and eventlog.apart else None
        self._apart = int(self.eventlog is not None)

    def _fenced(self, job_id: str, owner: bytes | None) -> str | None:
        """The owner string a take gave, once its log is fenced (where apart); None if the take came to nothing."""
        owner = owner.decode() if owner else None
        if owner and self.eventlog is not None and self.eventlog.fence(job_id, owner)[1] == -1:
            return None
        return owner

    def acquire(self, owner: str, rq_worker: str, queue_names: Sequence[str], want: int, now_ms: int,
                now_rq: str) -> list[Acquired]:
        """Take up to ``want`` jobs under ``owner``'s lease from the model queues ``queue_names``
        (highest priority first), the tenants' queues under each taken in turn."""
        queue_keys = [k for q in queue_names for k in (keys.queue_ring(q), keys.rq_queue(q))]
        rows = _ACQUIRE(self.redis, {"leases": keys.LEASES},
                        {"owner": owner, "worker": rq_worker, "now_ms": now_ms, "now_rq": now_rq, "want": want,
                         "apart": self._apart},
                        queue_keys)
        out = []
        for job_id, queue_key, next_seq, closed, owner_, flat in rows:
            fields = dict(zip(flat[::2], flat[1::2]))
            if self.eventlog is not None and owner_:
                try:
                    next_seq, state = self.eventlog.fence(job_id.decode(), owner_.decode(),
                                                          fields.get(b"queued_event", b""))
                except (redis.RedisError, redis.exceptions.RedisClusterException):
                    # The events store failed between the two steps: the job goes back to the front of its
                    # queue now, not after the reaper's patience (which would spend its one requeue).
                    self._give_back(job_id.decode(), owner_.decode(), queue_key.decode())
                    continue
                closed = state != 1  # closed, or a later take's (then nothing to run here either)
            out.append(Acquired(job_id.decode(), queue_key.decode(), int(next_seq), bool(closed), owner_.decode(),
                                fields))
        return out

    def _give_back(self, job_id: str, owner: str, queue_key: str) -> None:
        queue_name = queue_key[len(keys.RQ_QUEUE_PREFIX):]
        try:
            self._requeue(job_id, owner, queue_name, keys.queue_model(queue_name))
        except redis.RedisError:
            pass  # the queue's Redis too: the reaper finds the lease standing still

    def _requeue(self, job_id: str, owner: str, queue_name: str, model: str):
        return _REQUEUE(self.redis, {"lease": keys.job_lease(job_id), "leases": keys.LEASES,
                                     "queue": keys.rq_queue(queue_name), "job": keys.rq_job(job_id),
                                     "wake": keys.model_wake(model), "ring": keys.queue_ring(queue_name),
                                     "info": keys.job_info(job_id)},
                        {"owner": owner, "job": job_id, "queue_name": queue_name, "apart": self._apart})

    def renew(self, held: Sequence[tuple[str, str]]) -> list[str]:
        """Renew leases given as (job id, owner); the ids whose owner no longer holds them."""
        if not held:
            return []
        ok = _RENEW(self.redis, {}, {}, [keys.job_lease(j) for j, _ in held], [o for _, o in held])
        return [j for (j, _), kept in zip(held, ok) if not kept]

    def observe(self, limit: int = 100_000) -> list[LeaseView]:
        """Every lease's owner and renewal count, in one call."""
        rows = _OBSERVE(self.redis, {"leases": keys.LEASES}, {"limit": limit})
        return [LeaseView(j.decode(), o.decode(), r.decode()) for j, o, r in rows]

    def claim(self, seen: LeaseView, new_owner: str) -> str | None:
        """Take the lease over if it still stands exactly as ``seen``: the owner string to write as, or None."""
        got = _CLAIM(self.redis, {"lease": keys.job_lease(seen.job_id)},
                     {"id": seen.job_id, "owner": seen.owner, "renewals": seen.renewals, "new_owner": new_owner,
                      "apart": self._apart})
        return self._fenced(seen.job_id, got)

    def take_over(self, job_id: str, owner: str, new_owner: str) -> str | None:
        """Move ``owner``'s lease to ``new_owner`` (a worker handing its own job to its reaper: its engine
        thread's later writes are then fenced): the owner string to write as, or None."""
        got = _TAKE_OVER(self.redis, {"lease": keys.job_lease(job_id)},
                         {"id": job_id, "owner": owner, "new_owner": new_owner, "apart": self._apart})
        return self._fenced(job_id, got)

    def requeue(self, job_id: str, owner: str, queue_name: str, model: str) -> bool:
        """Give the job back, to the front of its queue (and its queue to the front of the ring),
        if ``owner`` holds it."""
        fence = self._requeue(job_id, owner, queue_name, model)
        self._fenced(job_id, fence)  # a take after the requeue may have fenced it already: fine
        return bool(fence)

    def adopt(self, job_id: str, owner: str, now_ms: int) -> str | None:
        """Lease a job that shows as running but has no lease (one lost in a Redis restart), to close it: the
        owner string to write as, or None."""
        got = _ADOPT(self.redis, {"lease": keys.job_lease(job_id), "leases": keys.LEASES},
                     {"owner": owner, "id": job_id, "now_ms": now_ms, "apart": self._apart})
        return self._fenced(job_id, got)

    def owners(self, job_ids: Iterable[str]) -> dict[str, str]:
        pipe = self.redis.pipeline(transaction=False)
        ids = list(job_ids)
        for j in ids:
            pipe.hget(keys.job_lease(j), "owner")
        return {j: (o or b"").decode() for j, o in zip(ids, pipe.execute())}


def cancel_queued(client: redis.Redis, job_id: str, queue_name: str) -> int:
    """Take a queued job out of its queue if no worker holds it: 1 done, 0 a worker runs it,
    -1 it is in no queue (a worker is taking it, or it ended)."""
    return int(_CANCEL_QUEUED(client, {"lease": keys.job_lease(job_id), "queue": keys.rq_queue(queue_name),
                                       "job": keys.rq_job(job_id)}, {"id": job_id}))
