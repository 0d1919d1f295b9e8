"""Cooperative cancellation: a cancel reaches the engine through its inbox, between two decode steps.

The API sets a flag key for the job and publishes its id on the cancel
channel. One thread per worker listens and posts a ``Cancel`` to the engine's
inbox for a job it watches (worker.inbox), so the scheduler sees it at its
next step; a job is watched from the moment the worker prepares it, and the
flag, read then, catches a cancel sent before. A message published while the
listener was reconnecting is lost, so after every (re)subscribe the flags of
all watched jobs are read again.
"""
from __future__ import annotations

import logging
import threading
import time

import redis

from queue_schema import keys
from worker.inbox import Cancel, Inbox

log = logging.getLogger(__name__)


class CancelWatcher:
    def __init__(self, client: redis.Redis, inbox: Inbox):
        self.redis = client
        self.inbox = inbox
        self._watched: set[str] = set()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        threading.Thread(target=self._listen, name="inferq-cancel", daemon=True).start()
        self._ready.wait(5)

    def watch(self, job_id: str) -> bool:
        """Start watching ``job_id``; True if it was cancelled before it got here."""
        with self._lock:
            self._watched.add(job_id)
        return bool(self.redis.exists(keys.job_cancel(job_id)))

    def unwatch(self, job_id: str) -> None:
        with self._lock:
            self._watched.discard(job_id)

    def _recheck(self) -> None:
        with self._lock:
            watched = list(self._watched)
        if not watched:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_id in watched:
            pipe.exists(keys.job_cancel(job_id))
        for job_id, flagged in zip(watched, pipe.execute()):
            if flagged:
                self.inbox.post(Cancel(job_id))

    def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(keys.CANCEL_CHANNEL)
                self._recheck()
                self._ready.set()
                delay = 0.1
                for message in pubsub.listen():
                    if message["type"] != "message":
                        continue
                    job_id = message["data"].decode()
                    with self._lock:
                        watched = job_id in self._watched
                    if watched:
                        self.inbox.post(Cancel(job_id))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._ready.set()
                log.warning("cancel listener lost redis (%s); reconnecting in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
