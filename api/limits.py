"""Open SSE streams, counted per principal and per API process.

A stream holds one of gunicorn's worker connections for as long as it is open;
without a bound, one client (or a flood of them) could take every connection
and leave ``/health`` unanswered. The counts live in the process (gevent runs
its greenlets on one thread; the lock covers the threaded dev server).
Submits per second and queued jobs per principal are Redis-side admission's
business, not this module's.
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Callable

from flask import Flask, current_app

from api import auth
from api.extensions import resources
from queue_schema.errors import ErrorCode, InferqError


class StreamSlots:
    def __init__(self, per_principal: int, per_process: int):
        self.per_principal, self.per_process = per_principal, per_process
        self._open: Counter[str] = Counter()
        self._total = 0
        self._lock = threading.Lock()

    def acquire(self, key: str) -> Callable[[], None] | str:
        """A release function (safe to call twice), or why no slot is free."""
        with self._lock:
            if self._total >= self.per_process:
                return f"this API process has {self.per_process} streams open"
            if key is not None and self._open[key] >= self.per_principal:
                return f"you have {self.per_principal} streams open"
            self._open[key] += 1
            self._total += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._total -= 1
                self._open[key] -= 1
                if not self._open[key]:
                    del self._open[key]

        return release

    def open_count(self, key: str | None = None) -> int:
        with self._lock:
            return self._total if key is None else self._open[key]


def stream_slot() -> Callable[[], None]:
    """Take a stream slot for the current principal, or raise 429 ``TOO_MANY_STREAMS``. With auth off every
    local client shares one address, so only the process bound applies: a local agent making 200 calls at
    once is one user, not 200."""
    key = auth.principal().limit_key if auth.enabled() else None
    slot = current_app.extensions["inferq_streams"].acquire(key)
    if isinstance(slot, str):
        raise InferqError(ErrorCode.TOO_MANY_STREAMS, f"too many open streams: {slot}; close one or retry later",
                          retriable=True, retry_after_s=resources().settings.retry_after.busy_s)
    return slot


def init_app(app: Flask) -> None:
    app.extensions["inferq_streams"] = StreamSlots(int(app.config["MAX_STREAMS_PER_TOKEN"]),
                                                   int(app.config["MAX_STREAMS"]))
