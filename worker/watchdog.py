"""A decode step stuck past a bound: the worker hands its running jobs on and takes no more meanwhile.

One ``llama_decode`` carries every running sequence, and a call into C cannot
be interrupted, so a step that hangs (a GPU fault, a driver stall) holds all
of them. Waiting would strand their clients; the worker's own lease renewals
go on, so the reaper would never step in. So a thread of its own watches the
scheduler's decode: past ``limit_s`` it moves each running job's lease to the
worker's reaper identity (which fences the engine thread's later writes) and
settles the job as the reaper settles a lost one: back to its queue if it
streamed nothing, else ended with a retriable ``INFERENCE_FAILED``. The
worker reports itself ``unhealthy`` (admission then sends no more jobs its
way), logs it and counts it (``inferq_worker_stuck_steps_total``). If the
call returns after all, its events are refused by the log and the worker
serves again.
"""
from __future__ import annotations

import logging
import threading
import time

import redis

from queue_schema.lifecycle import stats

log = logging.getLogger(__name__)


class StepWatchdog:
    def __init__(self, runtime, limit_s: float):
        self.rt = runtime
        self.limit_s = limit_s
        self.stuck = False  # the decode running now passed the bound: take no new jobs
        self._handled: float | None = None  # the decode_since already handled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inferq-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        interval = min(0.5, max(0.005, self.limit_s / 4))
        while not self._stop.wait(interval):
            try:
                self.check()
            except redis.RedisError as exc:  # tried again next time round: the step is still stuck
                self._handled = None
                log.warning("worker %s: could not hand on the jobs of a stuck step: %s", self.rt.id, exc)
            except Exception:  # never let a surprise stop the watch
                log.exception("worker %s: watchdog failed", self.rt.id)

    def check(self) -> None:
        since = self.rt.scheduler.decoding_since
        if since is None or since != self._handled:
            if self.stuck:  # the call came back
                self.stuck = False
                log.warning("worker %s: the stuck decode step returned; serving again", self.rt.id)
                if not self.rt.unhealthy:
                    self.rt.set_state("idle")
        if since is None or since == self._handled or time.monotonic() - since <= self.limit_s:
            return
        self._handled, self.stuck = since, True
        rt = self.rt
        running = rt.scheduler.running()
        log.error("worker %s: a decode step has run for %.1f s (the bound is %g s); handing on its %d jobs "
                  "and taking no more until it returns", rt.id, time.monotonic() - since, self.limit_s,
                  len(running))
        rt.set_state("unhealthy")
        pipe = rt.redis.pipeline(transaction=False)
        stats.count(pipe, "stuck_steps", rt.spec.name)
        pipe.execute()
        why = f"worker {rt.id}'s decode step was stuck for more than {self.limit_s:g} s"
        owners = dict(rt.jobs.held())
        for job_id in running:
            owner = owners.get(job_id)
            writer = owner and rt.leases.take_over(job_id, owner, rt.reaper.id)
            if writer:
                rt.reaper.handle_lost(job_id, owner, writer, code="INFERENCE_FAILED", message=why)
