"""Cooperative cancellation: the scheduler asks between decode steps.

The API sets a flag key for the job and publishes its id on the cancel
channel. One thread per worker listens and trips the Event of a job it runs,
so the scheduler's check is a memory read, not a Redis round trip. A message
published while the listener was reconnecting is lost, so after every
(re)subscribe the flags of all watched jobs are read again.
"""
from __future__ import annotations

import logging
import threading
import time

import redis

from queue_schema import keys

log = logging.getLogger(__name__)


class CancelWatcher:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._watched: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        threading.Thread(target=self._listen, name="inferq-cancel", daemon=True).start()
        self._ready.wait(5)

    def watch(self, job_id: str) -> threading.Event:
        """Start watching ``job_id``; the Event is already set if it was cancelled before it arrived."""
        event = threading.Event()
        with self._lock:
            self._watched[job_id] = event
        if self.redis.exists(keys.job_cancel(job_id)):
            event.set()
        return event

    def unwatch(self, job_id: str) -> None:
        with self._lock:
            self._watched.pop(job_id, None)

    def _recheck(self) -> None:
        with self._lock:
            watched = dict(self._watched)
        if not watched:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_id in watched:
            pipe.exists(keys.job_cancel(job_id))
        for (job_id, event), flagged in zip(watched.items(), pipe.execute()):
            if flagged:
                event.set()

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
                    with self._lock:
                        event = self._watched.get(message["data"].decode())
                    if event is not None:
                        event.set()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._ready.set()
                log.warning("cancel listener lost redis (%s); reconnecting in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
