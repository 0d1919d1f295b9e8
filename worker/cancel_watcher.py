"""Cooperative cancellation: the token loop asks between tokens.

The API publishes a job id on the cancel channel (and sets a flag key for a
job that has not reached a worker yet). One thread per worker listens and
trips an Event when it names the running job, so the token loop's check is a
memory read, not a Redis round trip.
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
        self._job_id: str | None = None
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        threading.Thread(target=self._listen, name="inferq-cancel", daemon=True).start()
        self._ready.wait(5)

    def watch(self, job_id: str) -> None:
        """Start watching ``job_id``; already cancelled if the flag was set before it arrived."""
        with self._lock:
            self._job_id = job_id
            self._cancelled.clear()
        if self.redis.exists(keys.job_cancel(job_id)):
            self._cancelled.set()

    def clear(self) -> None:
        with self._lock:
            self._job_id = None
            self._cancelled.clear()

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(keys.CANCEL_CHANNEL)
                self._ready.set()
                delay = 0.1
                for message in pubsub.listen():
                    if message["type"] != "message":
                        continue
                    job_id = message["data"].decode()
                    with self._lock:
                        if job_id == self._job_id:
                            self._cancelled.set()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._ready.set()
                log.warning("cancel listener lost redis (%s); reconnecting in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
