"""Lease renewal: every second, the worker bumps the renewal count of each job it holds.

The reaper (queue_schema.lifecycle.reaper) watches those counts; one that
stands still for ``lease_stale_s`` means a lost worker. A renewal that finds a
lease gone means this worker lost the job (another process took it over):
the job is dropped from the engine and forgotten, unless its terminal event
is already with the publisher, whose result settles it (worker.jobs).
"""
from __future__ import annotations

import logging
import threading

import redis

from queue_schema.lifecycle.eventlog import Appended

log = logging.getLogger(__name__)
RENEW_S = 1.0


class LeaseRenewal:
    def __init__(self, worker_id: str, leases, jobs):
        self.id, self.leases, self.jobs = worker_id, leases, jobs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inferq-renewal", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self.renew()
            except redis.RedisError as exc:  # the lease stands still meanwhile; the reaper is patient (8 s)
                log.warning("worker %s: lease renewal failed: %s", self.id, exc)
            except Exception:  # never let a surprise stop the renewals
                log.exception("worker %s: lease renewal failed", self.id)

    def renew(self) -> None:
        held = self.jobs.held()
        owners = dict(held)
        for job_id in self.jobs.really_lost(self.leases.renew(held)):
            log.warning("worker %s: lost the lease of job %s; stopping it", self.id, job_id)
            self.jobs.logged(job_id, owners[job_id], Appended.FENCED, False)
