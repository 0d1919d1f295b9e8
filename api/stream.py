"""Server-Sent Events: a job's events, replayed from its log and then live.

Extends flask-sse's blueprint: flask-sse gives the message format (the worker
publishes flask-sse messages) and the response; this adds the shared Redis
pool, replay from ``Last-Event-ID``, de-duplication and gap back-fill,
keep-alive comments, and the end of the stream after ``end``/``error``.

Order matters: subscribe first (on the process's shared pub/sub connection,
api/fanout.py), then replay the log, then relay live messages, skipping what
was already sent. An event published between the
replay and the first live read is therefore either in the log or on the
channel, never in neither.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import redis
from flask import current_app, request, stream_with_context
from flask_sse import ServerSentEventsBlueprint

from api import lifecycle
from api.extensions import resources
from queue_schema import keys
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.eventlog import RelayedFrame, logged_frame
from queue_schema.events import TERMINAL_TYPES

log = logging.getLogger(__name__)
SUBSCRIBE_WAIT_S = 5.0


class EventStreamBlueprint(ServerSentEventsBlueprint):
    @property
    def redis(self):
        return resources().redis

    def job_batches(self, job_id: str, after_seq: int, keepalive_s: float) -> Iterator[list[RelayedFrame]]:
        """One job's events after ``after_seq``, in order, as batches (one write each); [] on silence."""
        eventlog = resources().eventlog
        with resources().channels.subscribe(keys.job_channel(job_id), SUBSCRIBE_WAIT_S) as sub:
            frames, sent, done = _frames_from_log(eventlog, job_id, after_seq)
            if frames:
                yield frames
            if done:
                return
            if not frames:  # nothing after Last-Event-ID: it may be at or past the end already
                last = eventlog.last(job_id)
                if last is not None and last.terminal and last.seq <= sent:
                    return
            quiet_since = time.monotonic()
            while not lifecycle.stopping.is_set():
                batch = sub.get_batch(timeout=min(1.0, keepalive_s))
                if not batch:
                    if time.monotonic() - quiet_since >= keepalive_s:
                        quiet_since = time.monotonic()
                        # A quiet channel may also mean a message was lost: the log has the truth.
                        frames, sent, done = _frames_from_log(eventlog, job_id, sent)
                        yield frames
                        if done:
                            return
                    continue
                frames, done = [], False
                for frame in batch:
                    if frame.seq <= sent:
                        continue
                    if frame.seq > sent + 1:  # missed on the channel: back-fill from the log
                        frames += map(logged_frame, eventlog.replay(job_id, after_seq=sent, until_seq=frame.seq - 1))
                    frames.append(frame)
                    sent = frame.seq
                    if frame.type in TERMINAL_TYPES:
                        done = True
                        break
                if frames:
                    yield frames
                    quiet_since = time.monotonic()
                if done:
                    return

    def job_messages(self, job_id: str, after_seq: int, keepalive_s: float) -> Iterator[str]:
        """SSE text for one job's events after ``after_seq``; a comment on silence."""
        for frames in self.job_batches(job_id, after_seq, keepalive_s):
            yield "".join(f.text for f in frames) or ": keep-alive\n\n"

    def narration_messages(self, keepalive_s: float, backlog: int, follow: bool = True) -> Iterator[str]:
        """Every job's and worker's narration: recent ones from the log, then live (if ``follow``)."""
        with resources().channels.subscribe(keys.NARRATION_CHANNEL, SUBSCRIBE_WAIT_S) as sub:
            for event in resources().eventlog.recent_narration(backlog):
                yield logged_frame(event, with_id=False).text
            if not follow:
                return
            quiet_since = time.monotonic()
            while not lifecycle.stopping.is_set():
                batch = sub.get_batch(timeout=min(1.0, keepalive_s))
                if batch:
                    quiet_since = time.monotonic()
                    yield "".join(frame.text for frame in batch)
                elif time.monotonic() - quiet_since >= keepalive_s:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"

    def narration(self):
        """The operators' feed: narration of all jobs and workers, as SSE (never ends)."""
        backlog = min(max(request.args.get("backlog", 20, type=int), 0), 1000)
        follow = request.args.get("follow", "true").lower() not in ("0", "false", "no")
        keepalive = float(current_app.config["KEEPALIVE_S"])
        return _sse_response(self.narration_messages(keepalive, backlog, follow), "the narration feed")

    def job_stream(self, job_id: str):
        res = resources()
        if not res.eventlog.exists(job_id):
            raise InferqError(ErrorCode.JOB_NOT_FOUND, f"no event log for job {job_id!r} (unknown, or expired)")
        after = _last_event_id()
        keepalive = float(current_app.config["KEEPALIVE_S"])
        return _sse_response(self.job_messages(job_id, after, keepalive), f"the stream of job {job_id}")


def _frames_from_log(eventlog, job_id: str, after_seq: int) -> tuple[list[RelayedFrame], int, bool]:
    """Frames of the logged events after ``after_seq``, the last seq, and whether it ended."""
    frames, sent = [], after_seq
    for event in eventlog.replay(job_id, after_seq=after_seq):
        frames.append(logged_frame(event))
        sent = event.seq
        if event.terminal:
            return frames, sent, True
    return frames, sent, False


def _sse_response(messages, what: str):
    """An event-stream response for ``messages``; a Redis failure ends it quietly.

    Mid-stream the status line is long sent: ending the stream is all that is
    left, and the client reconnects (with Last-Event-ID) and resumes from the log.
    """
    retry = int(current_app.config["SSE_RETRY_MS"])

    @stream_with_context
    def generate():
        yield f"retry: {retry}\n\n"
        try:
            for message in messages:
                yield str(message)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("%s ended: redis unavailable (%s)", what, exc)

    return current_app.response_class(generate(), mimetype="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _last_event_id() -> int:
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if raw is None or raw == "":
        return -1
    try:
        value = int(raw)
    except ValueError:
        raise InferqError(ErrorCode.INVALID_REQUEST, "Last-Event-ID must be an event seq (an integer)") from None
    if value < -1:
        raise InferqError(ErrorCode.INVALID_REQUEST, "Last-Event-ID must be >= -1")
    return value


bp = EventStreamBlueprint("stream", __name__)
bp.add_url_rule("/v1/jobs/<job_id>/stream", endpoint="job_stream", view_func=bp.job_stream)
bp.add_url_rule("/v1/narration", endpoint="narration", view_func=bp.narration)
