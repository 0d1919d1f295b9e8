"""Jobs nobody is running any more: lost leases, open logs whose job went away, ends not settled.

Any inferq process can reap — every worker and every API process runs a
``Reaper`` — so a model's only worker dying is noticed by the API. One
process reaps at a time (a short lock in Redis); it watches every lease's
renewal count, and a lease that stands still for ``stale_s`` (8 s) on its
own clock, while Redis answered every look, is lost: the reaper takes the
lease over (compare-and-set) and either gives the job back to the front of
its queue, once, if it had streamed no token, or ends it with
``WORKER_LOST``. If Redis itself stalls (a look takes longer than
``STALL_S``, or fails), everything seen so far is forgotten: the owners
could not renew either.

Every ``SWEEP_S`` it also sweeps the open jobs for ones whose RQ job went
away without a lease: deleted or emptied from a queue in rq-dashboard (ended
with ``error`` ``CANCELLED``), cancelled in RQ (``end`` ``cancelled``), or
shown as running with no lease at all (a Redis restart lost it: handled like
a lost lease); settles the ends whose writer died before settling them
(queue_schema.lifecycle.ending); puts tenant queues that have jobs but are in
no ring back in their ring (fair share); drops tenant counts of jobs that are
gone; and every minute cleans RQ's ended-job registries. Every ending it
writes goes through ``Ending``, as every other writer's does.
"""
from __future__ import annotations

import logging
import threading
import time

import redis
from rq.job import JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from queue_schema import keys
from queue_schema.events import Error, Narration, Queued
from queue_schema.lifecycle import books, clock, leases, scripts, tenants
from queue_schema.lifecycle import views as jobs
from queue_schema.lifecycle.ending import WEBHOOK_RECORD_TTL_S, Ending
from queue_schema.lifecycle.eventlog import EventLog
from queue_schema.settings import DEFAULTS, Settings

log = logging.getLogger(__name__)
STALL_S = 3.0  # looks further apart than this (Redis stalled, or we did) start the watch over
TICK_S = 1.0
LOCK_MS = 3000
SWEEP_S = 10.0
SWEEP_MIN_AGE_S = 5.0  # an open job younger than this is left alone (it is being admitted)
SWEEP_BATCH = 500
SETTLE_AFTER_S = 5.0  # an end its writer has not settled this long after it was written is the reaper's
REGISTRY_SWEEP_S = 60.0  # RQ's finished, failed and cancelled registries: expired entries dropped this often
_LOCK, _UNLOCK = scripts.load("reaper_lock"), scripts.load("reaper_unlock")
_ORPHANS, _RING_ADD = scripts.load("reaper_orphans"), scripts.load("ring_add")


class Reaper:
    def __init__(self, client: redis.Redis, identity: str, eventlog: EventLog | None = None,
                 settings: Settings = DEFAULTS):
        self.redis = client
        self.id = identity  # the lease owner it writes as, once it took a lost job over
        self.eventlog = eventlog or EventLog(client, settings.job_ttl_s)
        self.ending = Ending(client, self.eventlog)
        self.leases = leases.Leases(client, self.eventlog)
        self.stale_s = settings.lease_stale_s
        self._seen: dict[str, tuple[leases.LeaseView, float]] = {}
        self._last_look: float | None = None
        self._next_sweep = 0.0
        self._next_registry_sweep = 0.0
        self._stop = threading.Event()

    # --- the loop ----------------------------------------------------------------------
    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="inferq-reaper", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except redis.RedisError as exc:
                log.warning("reaper %s: Redis unavailable (%s)", self.id, exc)
            except Exception:  # never let a surprise stop reaping
                log.exception("reaper %s: tick failed", self.id)

    def stop(self) -> None:
        self._stop.set()
        try:
            _UNLOCK(self.redis, {"lock": keys.REAPER}, {"holder": self.id})
        except redis.RedisError:
            pass

    def tick(self) -> list[tuple[str, str]]:
        """One look; returns (job id, what was done) for each job handled."""
        before = time.monotonic()
        if self._last_look is None or before - self._last_look > STALL_S:
            self._seen.clear()
        if not _LOCK(self.redis, {"lock": keys.REAPER}, {"holder": self.id, "ttl_ms": LOCK_MS}):
            self._seen.clear()  # another process watches; ours would be stale when the role comes back
            self._last_look = None
            return []
        views = self.leases.observe()
        looked = time.monotonic()
        if looked - before > STALL_S:  # the look itself stalled: what it saw proves nothing
            self._seen.clear()
        self._last_look = looked
        lost = []
        current = {}
        for view in views:
            seen = self._seen.get(view.job_id)
            if seen is None or seen[0] != view:
                current[view.job_id] = (view, looked)
            else:
                current[view.job_id] = seen
                if looked - seen[1] >= self.stale_s:
                    lost.append(view)
        self._seen = current
        done = []
        for view in lost:
            writer = self.leases.claim(view, self.id)
            if writer:
                self._seen.pop(view.job_id, None)
                done.append((view.job_id, self.handle_lost(view.job_id, view.owner, writer)))
        if looked >= self._next_sweep:
            self._next_sweep = looked + SWEEP_S
            done += self.sweep()
        return done

    # --- lost jobs -----------------------------------------------------------------------
    def handle_lost(self, job_id: str, owner: str, writer: str, code: str = "WORKER_LOST",
                    message: str | None = None) -> str:
        """The job's lease is ours now (``writer``, the owner string the take gave us; ``owner``, the one that
        lost it): requeue it once if it streamed nothing, else end it with ``code`` (retriable) and
        ``message`` (by default: its worker stopped renewing its lease)."""
        job = books.fetch(self.redis, job_id)
        history = self.eventlog.replay(job_id)
        tokens = sum(1 for e in history if e.type in ("token", "embedding"))  # what a client may have seen
        seq = self.eventlog.next_seq(job_id)  # past the claim's fence too
        worker = leases.worker_of(owner) or "unknown"
        if history and history[-1].terminal:  # its writer died between its end and the settle
            self.ending.settle(job_id, history[-1])
            return "settled"
        meta = job.meta if job is not None else {}
        model, priority = meta.get("model"), meta.get("priority")
        if job is not None and tokens == 0 and books.may_requeue(job) and priority in keys.PRIORITIES:
            books.count_requeue(job)
            # Back to its tenant's queue (the model's own for jobs with none).
            queue = job.origin if keys.base_queue_name(job.origin) == keys.queue_name(model, priority) \
                else keys.queue_name(model, priority)
            story = dict(actor=self.id, action="requeue", target=job_id,
                         human=f"Worker {worker} was lost before the first token; "
                               "the job goes back to the front of its queue")
            self.eventlog.append_many([Narration(job_id=job_id, seq=seq, **story),
                                       Queued(job_id=job_id, seq=seq + 1, position=0, queue=queue)], writer)
            books.give_back(self.redis, self.leases, job, writer, queue, model)
            action = "requeued"
        else:
            message = (message or f"worker {worker} was lost (it stopped renewing its lease)") + \
                f" after {tokens} tokens; the job can be submitted again"
            self.ending.end(Error(job_id=job_id, seq=seq, code=code, message=message, retriable=True), writer)
            action = "failed"
        log.warning("job %s: worker %s lost; %s by %s", job_id, worker, action, self.id)
        return action

    # --- orphans -------------------------------------------------------------------------
    def sweep(self) -> list[tuple[str, str]]:
        done = self._sweep_open_logs()
        done += self._sweep_unsettled()
        done += self._sweep_rings()
        if tenants.tidy(self.redis):
            log.warning("reaper %s: dropped tenant counts of jobs that had ended (Redis lost writes?)", self.id)
        now = clock.now_ms(self.redis)
        if forget_stale_webhooks(self.redis, now):
            log.warning("reaper %s: dropped webhook deliveries no API process could sign in time", self.id)
        if now >= self._next_registry_sweep:
            self._next_registry_sweep = now + REGISTRY_SWEEP_S * 1000
            self._sweep_registries()
        return done

    def _sweep_registries(self) -> None:
        """Expired entries of RQ's ended-job registries. RQ's own worker cleans them as it runs, and
        inferq does not run RQ's loop: without this they would go only when rq-dashboard counts them.
        RQ's cleanup is used where it has one; its cancelled registry has none, and gets the same."""
        pipe = self.redis.pipeline(transaction=False)
        for name in self.redis.smembers(keys.RQ_QUEUES):
            queue = name.decode()[len(keys.RQ_QUEUE_PREFIX):]
            if not queue.startswith(keys.QUEUE_PREFIX):
                continue
            for registry in (FinishedJobRegistry, FailedJobRegistry):
                registry(queue, connection=self.redis, serializer=JSONSerializer).cleanup()
            pipe.zremrangebyscore(CanceledJobRegistry(queue, connection=self.redis).key, 0, time.time())
        pipe.execute()

    def _sweep_rings(self) -> list[tuple[str, str]]:
        """Tenant queues with jobs but in no ring (a job requeued in rq-dashboard, RQ's own enqueue):
        put them back in their rings, so fair share finds them."""
        names = [n.decode()[len(keys.RQ_QUEUE_PREFIX):] for n in self.redis.smembers(keys.RQ_QUEUES)]
        names = [n for n in names if n.startswith(keys.QUEUE_PREFIX) and keys.TENANT_QUEUE_SEP in n]
        if not names:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.llen(keys.rq_queue(name))
            pipe.lpos(keys.queue_ring(name), name)
        found = pipe.execute()
        done = []
        for i, name in enumerate(names):
            if found[2 * i] and found[2 * i + 1] is None:
                _RING_ADD(self.redis, {"ring": keys.queue_ring(name), "queue": keys.rq_queue(name)}, {"name": name})
                done.append((name, "ring repaired"))
        return done

    def _sweep_open_logs(self) -> list[tuple[str, str]]:
        cutoff = clock.now_ms(self.redis) - int(SWEEP_MIN_AGE_S * 1000)
        done = []
        for ids in _pages(self.redis, keys.OPEN_JOBS, cutoff, SWEEP_BATCH):
            for job_id, status in _ORPHANS(self.redis, more_args=ids):
                action = self._orphan(job_id.decode(), status.decode())
                if action:
                    done.append((job_id.decode(), action))
        return done

    def _orphan(self, job_id: str, status: str) -> str | None:
        last = self.eventlog.last(job_id)
        if last is None and status == JobStatus.QUEUED.value and self.eventlog.apart:
            # Admitted, and its queued event not written yet (the events store failed right after admission):
            # it is in RQ's job hash.
            event = self.redis.hget(keys.rq_job(job_id), "queued_event")
            if event:
                self.eventlog.write_queued(job_id, event)
                return "queued event written"
        if last is None:  # the log expired: nothing is open any more
            self.redis.zrem(keys.OPEN_JOBS, job_id)
            return None
        if last.terminal:  # ended, and not settled (the sweep of unsettled ends gets there too)
            return "settled" if self.ending.settle(job_id, last) else None
        seq = last.seq + 1
        if status == "missing":
            event = Error(job_id=job_id, seq=seq, code="CANCELLED", retriable=False,
                          message="the job was deleted from RQ (rq-dashboard, or RQ's own API) before it ran")
            action = "deleted"
        elif status in (JobStatus.CANCELED.value, JobStatus.STOPPED.value):
            event = jobs.cancelled_end(job_id, seq)
            action = "cancelled"
        elif status in (JobStatus.STARTED.value, JobStatus.FINISHED.value, JobStatus.FAILED.value):
            # Shown as running (or ended by RQ itself) with no lease and an open log: nobody will end it.
            writer = self.leases.adopt(job_id, self.id, clock.now_ms(self.redis))
            if not writer:
                return None
            return self.handle_lost(job_id, "", writer)
        else:
            return None  # queued: it is waiting for a worker
        if self.ending.end(event) != 1:
            return None
        log.info("job %s: its RQ job was %s outside inferq; its stream is closed", job_id, action)
        return action

    def _sweep_unsettled(self) -> list[tuple[str, str]]:
        """Ends whose writer died between the terminal event and the settle (queue_schema.lifecycle.ending)."""
        done = []
        for job_id in self.ending.unsettled(int(SETTLE_AFTER_S * 1000)):
            if self.ending.settle(job_id):
                log.warning("job %s: its end was written but not settled (its writer died?); settled", job_id)
                done.append((job_id, "settled"))
            else:  # its log expired, or someone settled it meanwhile
                self.redis.zrem(keys.SETTLING, job_id)
        return done


def _pages(client: redis.Redis, key: str, high: float, size: int):
    """The members of a sorted set scored up to ``high``, in pages in (score, member) order, which is
    Redis's own. Paging by an exclusive score would skip the members that tie with a page's last one
    (jobs admitted in the same millisecond); the cursor is the pair, so none is skipped, and members
    removed meanwhile (ended jobs) move nothing."""
    last: tuple[float, bytes] | None = None
    while True:
        if last is None:
            rows = client.zrangebyscore(key, "-inf", high, start=0, num=size, withscores=True)
        else:
            score, member = last
            # The rest of the tie first (few: jobs of one millisecond), then what scores above it.
            ties = [(m, score) for m in client.zrangebyscore(key, score, score) if m > member]
            rows = ties[:size] if len(ties) >= size else ties + client.zrangebyscore(
                key, f"({score!r}", high, start=0, num=size - len(ties), withscores=True)
        if not rows:
            return
        yield [m.decode() for m, _ in rows]
        if len(rows) < size:
            return
        last = (rows[-1][1], rows[-1][0])


def forget_stale_webhooks(client: redis.Redis, now_ms: int) -> int:
    """Drop schedule entries due so long ago that their records have expired (nobody could sign them)."""
    return int(client.zremrangebyscore(keys.WEBHOOKS_DUE, "-inf", now_ms - WEBHOOK_RECORD_TTL_S * 1000))
