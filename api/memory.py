"""Redis memory: new work is refused while Redis is close to its ``maxmemory``, so running jobs can end.

Under ``maxmemory-policy noeviction`` (what a queue needs: evicting would
drop jobs and logs) a full Redis refuses every write, a running job's tokens
and its one terminal event among them. So admission stops first: once used
memory is within ``INFERQ_REDIS_HEADROOM`` (a fraction of ``maxmemory``, 10 %
by default) of the limit, submits, uploads and new batches get 503
``STORAGE_FULL`` with ``Retry-After``, while what runs keeps the headroom to
finish in; as ended jobs' logs expire, admission opens again. Without a
``maxmemory`` (0), or with a headroom of 0, nothing is refused here (Redis's
own OOM answers are then the 503 ``REDIS_UNAVAILABLE``).

``INFO memory`` is read at most once a second per process: the headroom is
far larger than what one second of submits can write.
"""
from __future__ import annotations

import threading
import time

import redis
from flask import current_app

from queue_schema.errors import ErrorCode, InferqError

READ_EVERY_S = 1.0


class MemoryGuard:
    def __init__(self, client: redis.Redis, headroom: float, retry_after_s: float):
        self.redis, self.headroom, self.retry_after_s = client, headroom, retry_after_s
        self._lock = threading.Lock()
        self._read_at = -READ_EVERY_S
        self._state: tuple[int, int] = (0, 0)  # used, maxmemory

    def state(self) -> tuple[int, int]:
        """(used bytes, maxmemory) as of the last read, read again if older than a second."""
        if time.monotonic() - self._read_at >= READ_EVERY_S:
            with self._lock:
                if time.monotonic() - self._read_at >= READ_EVERY_S:
                    info = self.redis.info("memory")
                    self._state = (int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)))
                    self._read_at = time.monotonic()
        return self._state

    def check(self) -> None:
        """Raise 503 STORAGE_FULL when used memory is within the headroom of ``maxmemory``."""
        used, limit = self.state()
        if limit and self.headroom > 0 and used >= limit * (1 - self.headroom):
            raise InferqError(ErrorCode.STORAGE_FULL, f"Redis holds {used} of its {limit} bytes (maxmemory): new "
                              "work waits until ended jobs' logs expire, so that running jobs can finish; retry "
                              "later, or give Redis more memory", retriable=True, retry_after_s=self.retry_after_s)


def check() -> None:
    current_app.extensions["inferq_memory"].check()
