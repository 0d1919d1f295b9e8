"""One clock for the fleet: the queue's Redis ``TIME``, carried forward on each host's monotonic clock.

Times that one process writes and another compares (a heartbeat's score
against a submit's "now", a job's submit time against the worker that takes
it, a claim's end against whoever claims next) must come from one clock:
hosts' wall clocks disagree, and a worker 30 s ahead of the API used to see
every job as 30 s old (``ttl_s`` failed at once) while one 30 s behind looked
dead to admission. Every inferq process reads Redis's ``TIME`` once, notes
its own monotonic clock at that moment, and from then on tells the time as
Redis's plus the monotonic time elapsed: no round trip per reading, and a
wall clock that jumps (NTP, a suspended laptop) changes nothing. It reads
``TIME`` again every ``RESYNC_S`` to follow the server's drift.

A Sentinel failover brings a new primary, and with it its own clock: readings
move by the two machines' skew (small when both run NTP) at the next resync.
Durations measured inside one process (the reaper's watch, a decode deadline)
stay on that process's monotonic clock, which no other host reads.
"""
from __future__ import annotations

import threading
import time
import weakref

import redis

RESYNC_S = 30.0


class FleetClock:
    """Milliseconds since the epoch on the queue's Redis clock. Safe to share between threads."""

    def __init__(self, client: redis.Redis, resync_s: float = RESYNC_S):
        self.redis = client
        self.resync_s = resync_s
        self._lock = threading.Lock()
        self._base: tuple[float, float] | None = None  # (Redis's time in ms, this host's monotonic then)
        self._next_sync = 0.0  # monotonic

    def now_ms(self) -> int:
        return int(self._now())

    def now_s(self) -> float:
        return self._now() / 1000

    def now_us(self) -> int:
        return int(self._now() * 1000)

    def _now(self) -> float:
        if time.monotonic() >= self._next_sync:
            self._sync()
        base = self._base
        if base is None:  # Redis never answered: this host's clock, until it does
            return time.time() * 1000
        return base[0] + (time.monotonic() - base[1]) * 1000

    def _sync(self) -> None:
        with self._lock:
            if time.monotonic() < self._next_sync:
                return  # another thread just did
            before = time.monotonic()
            try:
                seconds, micros = self.redis.time()
            except redis.RedisError:
                self._next_sync = time.monotonic() + 1.0  # keep the old reading; try again shortly
                return
            after = time.monotonic()
            # The reply was made somewhere in the round trip: its middle is the best guess.
            self._base = (seconds * 1000 + micros / 1000, (before + after) / 2)
            self._next_sync = after + self.resync_s


_clocks: "weakref.WeakKeyDictionary[redis.Redis, FleetClock]" = weakref.WeakKeyDictionary()
_clocks_lock = threading.Lock()


def of(client: redis.Redis) -> FleetClock:
    """The clock of the Redis ``client`` talks to: one per client, so a process reads TIME once per resync."""
    found = _clocks.get(client)
    if found is None:
        with _clocks_lock:
            found = _clocks.setdefault(client, FleetClock(client))
    return found


def now_ms(client: redis.Redis) -> int:
    return of(client).now_ms()


def now_s(client: redis.Redis) -> float:
    return of(client).now_s()
