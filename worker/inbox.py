"""The engine thread's one inbox: everything other threads ask of the scheduler, in order.

A job to run (from intake), a cancel (from the cancel listener), a job this
worker no longer holds (from the publisher or lease renewal: its log refused
the worker's events, or its lease is gone), and "end everything now" (a
second SIGTERM, Redis away too long). The scheduler drains the inbox at the
start of each step, so nothing reaches into the engine thread's state from
outside, and what arrives between two steps is seen by the next one.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from enum import Enum


class FinishReason(str, Enum):
    """How a job ended on the engine thread; the job layer (worker.jobs) tells it as events."""

    MAX_TOKENS = "max_tokens"  # as many tokens as asked, or the context is full
    EOS = "eos"  # the model ended its text
    STOP_SEQUENCE = "stop_sequence"  # one of the job's stop strings
    CANCELLED = "cancelled"  # a client asked
    DONE = "done"  # a task (an embed job) did all its work
    TIMEOUT = "timeout"  # past the job's timeout_s
    FAILED = "failed"  # a decode call raised
    REJECTED = "rejected"  # its grammar allowed no token
    GRAMMAR_SLOW = "grammar_slow"  # its grammar took too long to sample a token
    DROPPED = "dropped"  # the worker no longer holds its lease: not a word more
    ABORTED = "aborted"  # the worker is stopping now
    OVERFLOW = "overflow"  # Redis was away too long to keep the job's events

    @property
    def ran(self) -> bool:
        """An ending the job's stream tells as ``end`` (the others as ``error``, or not at all)."""
        return self in (FinishReason.MAX_TOKENS, FinishReason.EOS, FinishReason.STOP_SEQUENCE,
                        FinishReason.CANCELLED, FinishReason.DONE)


@dataclass(frozen=True)
class Submit:
    item: object  # a scheduler Sequence or Task


@dataclass(frozen=True)
class Cancel:
    job_id: str


@dataclass(frozen=True)
class Drop:
    """Stop a job's sequence without a word more: its lease is someone else's. ``owner`` names which take of
    the job (its lease owner string) when the worker may hold two: one it lost, and one it took again."""

    job_id: str
    owner: str | None = None


@dataclass(frozen=True)
class StopAll:
    reason: FinishReason


class Inbox:
    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()  # set by every post: the engine thread waits on it when idle
        self._submitted = 0  # posted Submits not yet taken (they hold job slots)
        self._lock = threading.Lock()

    def post(self, message) -> None:
        if isinstance(message, Submit):
            with self._lock:
                self._submitted += 1
        self._queue.put(message)
        self.wake.set()

    def drain(self) -> list:
        """Everything posted so far, in order (engine thread)."""
        out = []
        while True:
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                return out
            if isinstance(message, Submit):
                with self._lock:
                    self._submitted -= 1
            out.append(message)

    def submitted(self) -> int:
        with self._lock:
            return self._submitted
