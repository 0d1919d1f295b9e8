"""The intake thread: takes jobs from the model's queues while the scheduler has free slots.

It takes as many jobs as there are free slots in one lease call (highest
priority first; ``queue_schema.lifecycle.leases``), prepares them (``worker.jobs``) and
hands them to the scheduler, which admits them between two decode steps.
With nothing queued it blocks on the model's wake list, which every submit
pushes to, so an idle worker wakes at once without polling; a job enqueued
some other way (RQ's own API, a requeue) is found within a second.
"""
from __future__ import annotations

import logging
import threading
import time

import redis
from rq.utils import now, utcformat

from queue_schema import keys
from queue_schema.lifecycle import clock
from queue_schema.lifecycle.redis_errors import unavailable
from worker.inbox import Submit

log = logging.getLogger(__name__)
WAKE_WAIT_S = 1


class Intake:
    def __init__(self, runtime, wake_client: redis.Redis, burst: bool = False):
        self.rt = runtime
        self.wake_client = wake_client  # its own connection: BLPOP blocks it
        self.burst = burst  # stop taking jobs once the queues are empty
        self.queue_names = [keys.queue_name(runtime.spec.name, p) for p in keys.PRIORITIES]
        self.thread = threading.Thread(target=self._run, name="inferq-intake", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        rt, scheduler = self.rt, self.rt.scheduler
        delay = 0.1
        while not rt.stop_admitting:
            scheduler.slot_freed.clear()
            want = 0 if rt.watchdog.stuck else scheduler.capacity()
            if want <= 0:
                scheduler.slot_freed.wait(0.5)
                continue
            try:
                taken = rt.leases.acquire(rt.id, rt.id, self.queue_names, want, clock.now_ms(rt.redis),
                                           utcformat(now()))
                if not taken:
                    if self.burst:
                        rt.stop_admitting = True
                        rt.inbox.wake.set()
                        return
                    self.wake_client.blpop([keys.model_wake(rt.spec.name)], timeout=WAKE_WAIT_S)
                    continue
                try:
                    ready = rt.jobs.prepare(taken)
                except Exception:
                    rt.jobs.abandon(a.job_id for a in taken)
                    raise
                if ready:
                    rt.publish_record()  # the record lists a job before its first token can be seen
                for item in ready:
                    rt.inbox.post(Submit(item))
                delay = 0.1
                if len(taken) < want and not self.burst:
                    # The walk took all there was: another now would walk every priority for nothing (eight
                    # commands a job). A job submitted since pushed a wake, which this sees at once.
                    self.wake_client.blpop([keys.model_wake(rt.spec.name)], timeout=WAKE_WAIT_S)
            except Exception as exc:
                if not unavailable(exc):
                    log.exception("worker %s: taking jobs failed", rt.id)
                else:
                    log.warning("worker %s: Redis unavailable while taking jobs (%s); retrying in %.1fs",
                                rt.id, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        rt.inbox.wake.set()
