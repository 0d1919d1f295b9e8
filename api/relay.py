"""The relay: a job's events from its log, then live from its channel, in order, once each.

Order matters: subscribe first (on the process's shared pub/sub connection,
api/fanout.py), then replay the log, then relay live messages, skipping what
was already sent. An event published between the replay and the first live
read is therefore either in the log or on the channel, never in neither. A
gap on the channel (a message lost in a reconnect) is back-filled from the
log, and a quiet channel is checked against the log once per keep-alive.

Both the SSE stream routes and the OpenAI routes read jobs through here;
``merged_batches`` reads several jobs at once (an OpenAI request with ``n``
choices), one follower each, in the order their events arrive.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator

from flask import current_app

from api import auth, shutdown, sse
from api.extensions import resources
from queue_schema import keys
from queue_schema.events import TERMINAL_TYPES

SUBSCRIBE_WAIT_S = 5.0
LOG_PAGE = 256  # events read from a log per round trip


def job_batches(job_id: str, after_seq: int, keepalive_s: float,
                idle_s: float | None = None) -> Iterator[list[sse.Frame]]:
    """One job's events after ``after_seq``, in order, as batches (one write each); [] after ``idle_s``
    (default ``keepalive_s``) of silence, so a caller that waits can look around (is its client still there?)."""
    eventlog = resources().eventlog
    idle_s = keepalive_s if idle_s is None else min(idle_s, keepalive_s)
    with resources().channels.subscribe(keys.job_channel(job_id), SUBSCRIBE_WAIT_S) as sub:
        sent, done, any_frames = after_seq, False, False
        for frames, sent, done in _log_pages(eventlog, job_id, after_seq):
            any_frames = True
            yield frames
        if done:
            return
        if not any_frames:  # nothing after Last-Event-ID: it may be at or past the end already
            last = eventlog.last(job_id)
            if last is not None and last.terminal and last.seq <= sent:
                if last.seq < sent:  # the client saw events this log lost (a Redis failover): end it anyway
                    yield [sse.logged(last)]
                return
        quiet_since = checked = time.monotonic()
        while not shutdown.stopping.is_set():
            batch = sub.get_batch(timeout=min(1.0, idle_s))
            if not batch:
                now = time.monotonic()
                if now - checked >= keepalive_s:
                    quiet_since = checked = now
                    # A quiet channel may also mean a message was lost: the log has the truth.
                    for frames, sent, done in _log_pages(eventlog, job_id, sent, always=True):
                        yield frames
                    if done:
                        return
                elif now - quiet_since >= idle_s:
                    quiet_since = now
                    yield []
                continue
            frames, done = [], False
            for frame in batch:
                if frame.seq <= sent:
                    if frame.type in TERMINAL_TYPES:  # a log that lost events the client saw: still end
                        frames.append(frame)
                        done = True
                        break
                    continue
                if frame.seq > sent + 1:  # missed on the channel: back-fill from the log
                    frames += map(sse.logged, eventlog.replay(job_id, after_seq=sent, until_seq=frame.seq - 1))
                frames.append(frame)
                sent = frame.seq
                if frame.type in TERMINAL_TYPES:
                    done = True
                    break
            if frames:
                yield frames
                quiet_since = checked = time.monotonic()
            if done:
                return


def merged_batches(job_ids: list[str], keepalive_s: float) -> Iterator[list[tuple[int, sse.Frame]]]:
    """Every job's events from the start, as (index in ``job_ids``, frame) batches as they come; [] on
    silence. Each job is followed by its own thread (a greenlet under gevent) until it ends."""
    if len(job_ids) == 1:
        for frames in job_batches(job_ids[0], -1, keepalive_s):
            yield [(0, f) for f in frames]
        return
    app = current_app._get_current_object()
    out: queue.Queue = queue.Queue()
    stop = threading.Event()

    def follow(index: int, job_id: str) -> None:
        with app.app_context():
            try:
                for frames in job_batches(job_id, -1, keepalive_s):
                    if stop.is_set():
                        return
                    if frames:
                        out.put((index, frames))
            except Exception as exc:  # handed to the reader, which raises it
                out.put((index, exc))
            finally:
                out.put((index, None))

    for i, job_id in enumerate(job_ids):
        threading.Thread(target=follow, args=(i, job_id), name=f"inferq-relay-{job_id}", daemon=True).start()
    left = len(job_ids)
    try:
        while left:
            try:
                index, item = out.get(timeout=keepalive_s)
            except queue.Empty:
                yield []
                continue
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield [(index, f) for f in item]
    finally:
        stop.set()


def job_messages(job_id: str, after_seq: int, keepalive_s: float) -> Iterator[str]:
    """SSE text for one job's events after ``after_seq``; a comment on silence."""
    for frames in job_batches(job_id, after_seq, keepalive_s):
        yield "".join(f.text for f in frames) or sse.KEEPALIVE


def _narration_filter() -> Callable[[str | None], bool] | None:
    """Whether the caller may see narration about a job: workers' own narration (no job) always; a job's,
    if the caller may know of that job (its tenant's). One lookup per job per stream. None: the caller
    sees it all (an admin, or auth off), and the live frames need not be parsed."""
    if auth.sees_everything():
        return None
    known: dict[str, bool] = {}

    def visible(job_id: str | None) -> bool:
        if job_id is None:
            return True
        if job_id not in known:
            if len(known) > 10_000:
                known.clear()
            known[job_id] = job_id in auth.visible_jobs(resources().redis, [job_id])
        return known[job_id]
    return visible


def narration_messages(keepalive_s: float, backlog: int, follow: bool = True) -> Iterator[str]:
    """The narration of every worker and of the jobs the caller may see: recent ones from the log, then
    live (if ``follow``)."""
    visible = _narration_filter()
    with resources().narration.subscribe(keys.NARRATION_CHANNEL, SUBSCRIBE_WAIT_S) as sub:
        for event in resources().eventlog.recent_narration(backlog):
            if visible is None or visible(event.job_id):
                yield sse.logged(event, with_id=False).text
        if not follow:
            return
        quiet_since = time.monotonic()
        while not shutdown.stopping.is_set():
            batch = sub.get_batch(timeout=min(1.0, keepalive_s)) or ()
            if visible is not None:
                batch = [f for f in batch if visible(json.loads(f.data).get("job_id"))]
            # Narration is relayed without ids: the feed has no seq of its own.
            out = "".join(sse.frame(f.data, f.type) for f in batch)
            if out:
                quiet_since = time.monotonic()
                yield out
            elif time.monotonic() - quiet_since >= keepalive_s:
                quiet_since = time.monotonic()
                yield sse.KEEPALIVE


def _log_pages(eventlog, job_id: str, after_seq: int,
               always: bool = False) -> Iterator[tuple[list[sse.Frame], int, bool]]:
    """The logged events after ``after_seq`` as frames, ``LOG_PAGE`` at a time (an embed job's log can be
    megabytes: never read whole), each page with the last seq and whether the log ended there. ``always``:
    one (empty) page even when nothing is logged after ``after_seq``."""
    sent = after_seq
    while True:
        frames = []
        events = eventlog.replay(job_id, after_seq=sent, count=LOG_PAGE)
        for event in events:
            frames.append(sse.logged(event))
            sent = event.seq
            if event.terminal:
                yield frames, sent, True
                return
        if frames or always:
            yield frames, sent, False
        if len(events) < LOG_PAGE:
            return
        always = False
