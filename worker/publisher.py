"""A thread that writes events to Redis so decoding never waits on the network.

The scheduler hands over a decode step's events at once and moves on; the
thread drains whatever is pending into one fenced append (one Lua call for
every job in it, ``queue_schema.lifecycle.eventlog``). While Redis cannot take writes
(down, loading, read-only after a failover, out of memory) it keeps the batch
and retries with backoff: events are delayed, never dropped or reordered. The
buffer is bounded: past ``MAX_PENDING`` events the runtime ends its jobs with
a retriable error, which is written once Redis is back.

What the log said about each job comes back through ``on_result``: a job the
worker no longer holds (FENCED), or whose log ended (CLOSED), must stop; a
terminal event written means the job's books can be closed.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable

from queue_schema.events import EVENT_TYPES, _Event, now_ms
from queue_schema.lifecycle.eventlog import Appended, EventLog
from queue_schema.lifecycle.redis_errors import unavailable

log = logging.getLogger(__name__)
MAX_BATCH = 1024
MAX_PENDING = 200_000  # events held while Redis is away (about 40 MB)
# In a burst (events coming faster than one per BURST_S), wait LINGER_S after the
# first pending event before writing: one wake-up and one round trip per few
# steps instead of per step. Each wake-up steals a core from the decode threads,
# which matters more than 2 ms on a stream. Outside a burst there is nothing to
# batch, and the event goes out at once.
LINGER_S = 0.002
BURST_S = 0.005

OnResult = Callable[[str, str, Appended, bool], None]  # job id, owner written as, what the log said, terminal


class EventPublisher:
    def __init__(self, eventlog: EventLog, writer: str, on_result: OnResult | None = None):
        self.eventlog = eventlog
        self.writer = writer  # the lease owner this process writes as
        self.on_result = on_result
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._last_write = 0.0
        self.redis_down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="inferq-publisher", daemon=True)
        self._thread.start()

    def put(self, event: _Event) -> None:
        with self._lock:
            self._pending += 1
        self._queue.put(event)

    def put_many(self, events: list[_Event]) -> None:
        if events:
            with self._lock:
                self._pending += len(events)
            self._queue.put(events)

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def overflowing(self) -> bool:
        return self._pending > MAX_PENDING

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every event put so far is in Redis."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            if not isinstance(items[0], threading.Event) and time.monotonic() - self._last_write < BURST_S:
                time.sleep(LINGER_S)
            count = _count(items[0])
            while count < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                items.append(item)
                count += _count(item)
            events = [e for item in items if not isinstance(item, threading.Event) for e in _events(item)]
            if events:
                try:
                    self._write(events)
                except Exception:  # a bug: log it, never stop publishing the other jobs' events
                    log.exception("dropped %d events that could not be written", len(events))
                with self._lock:
                    self._pending -= len(events)
                self._last_write = time.monotonic()
            for item in items:
                if isinstance(item, threading.Event):
                    item.set()

    def _write(self, events: list[_Event]) -> None:
        delay = 0.05
        while True:
            try:
                results = self.eventlog.append_runs(events, self.writer)
                break
            except Exception as exc:
                if not unavailable(exc):
                    raise
                if self.redis_down_since is None:
                    self.redis_down_since = time.monotonic()
                log.warning("redis unavailable while publishing %d events (%s); retrying in %.1fs",
                            len(events), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.redis_down_since = None
        if self.on_result is None:
            return
        terminal = {(e.job_id, e._writer or self.writer) for e in events if e.job_id is not None and e.terminal}
        for (job_id, owner), status in results.items():
            if status != Appended.OK:
                log.warning("job %s: the event log refused the events written as %s (%s)", job_id, owner,
                            status.name)
            self.on_result(job_id, owner, status, status == Appended.OK and (job_id, owner) in terminal)


def _count(item) -> int:
    return len(item) if isinstance(item, list) else (0 if isinstance(item, threading.Event) else 1)


def _events(item) -> Iterable[_Event]:
    return item if isinstance(item, list) else (item,)


class JobEmitter:
    """Makes a job's events with consecutive seqs; where they go is the caller's business (the job layer hands
    a step's events to the publisher together)."""

    def __init__(self, job_id: str, first_seq: int, owner: str | None = None):
        self.job_id = job_id
        self.seq = first_seq
        self.owner = owner  # the lease owner string its events are written as (None: the publisher's writer)
        self.ended = False  # a terminal event was made: its append closes the log
        self.terminal: _Event | None = None  # that event

    def make(self, type_: str, **fields) -> _Event:
        cls = EVENT_TYPES[type_]
        if type_ == "token":  # the hot path: fields come from our own loop, skip re-validation
            event = cls.model_construct(job_id=self.job_id, seq=self.seq, ts=now_ms(), **fields)
        else:
            event = cls(job_id=self.job_id, seq=self.seq, **fields)
            if event.terminal:
                self.ended, self.terminal = True, event
        event._writer = self.owner
        self.seq += 1
        return event
