"""A thread that writes events to Redis so decoding never waits on the network.

The token loop hands events over and moves on; the thread drains whatever is
pending into one pipeline per round trip. If Redis is unreachable it keeps the
batch and retries with backoff: events are delayed, never dropped or reordered.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

import redis

from queue_schema.eventlog import EventLog
from queue_schema.events import EVENT_TYPES, _Event, now_ms

log = logging.getLogger(__name__)
MAX_BATCH = 512
# In a burst (events coming faster than one per BURST_S), wait LINGER_S after the
# first pending event before writing: one wake-up and one round trip per few
# tokens instead of per token. Each wake-up steals a core from the decode
# threads, which matters more than 2 ms on a stream. Outside a burst (the first
# token after the prompt, or a model slower than 200 tokens/s) there is nothing
# to batch, and the event goes out at once.
LINGER_S = 0.002
BURST_S = 0.005


class EventPublisher:
    def __init__(self, eventlog: EventLog):
        self.eventlog = eventlog
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._last_write = 0.0
        self._thread = threading.Thread(target=self._run, name="inferq-publisher", daemon=True)
        self._thread.start()

    def put(self, event: _Event) -> None:
        self._queue.put(event)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every event put so far is in Redis."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            if not isinstance(batch[0], threading.Event) and time.monotonic() - self._last_write < BURST_S:
                time.sleep(LINGER_S)
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = [e for e in batch if not isinstance(e, threading.Event)]
            if events:
                self._write(events)
                self._last_write = time.monotonic()
            for marker in batch:
                if isinstance(marker, threading.Event):
                    marker.set()

    def _write(self, events: list[_Event]) -> None:
        delay = 0.05
        while True:
            try:
                self.eventlog.append_many(events)
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis unavailable while publishing %d events (%s); retrying in %.1fs",
                            len(events), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except redis.ResponseError as exc:
                # A seq already taken (e.g. the API logged a cancel first): the log
                # keeps the first writer's event; later events of this batch are retried alone.
                log.warning("event log rejected a write for job %s: %s", events[0].job_id, exc)
                if len(events) == 1:
                    return
                for event in events:
                    self._write([event])
                return


class JobEmitter:
    """Builds a job's events with consecutive seq numbers and hands them to the publisher."""

    def __init__(self, job_id: str, publisher: EventPublisher, first_seq: int):
        self.job_id = job_id
        self.publisher = publisher
        self.seq = first_seq

    def emit(self, type_: str, **fields) -> _Event:
        cls = EVENT_TYPES[type_]
        if type_ == "token":  # the hot path: fields come from our own loop, skip re-validation
            event = cls.model_construct(job_id=self.job_id, seq=self.seq, ts=now_ms(), **fields)
        else:
            event = cls(job_id=self.job_id, seq=self.seq, **fields)
        self.seq += 1
        self.publisher.put(event)
        return event
