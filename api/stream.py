"""Server-Sent Events: a job's events, replayed from its log and then live.

Extends flask-sse's blueprint: flask-sse gives the message format (the worker
publishes flask-sse messages) and the response; this adds the shared Redis
pool, replay from ``Last-Event-ID``, de-duplication and gap back-fill,
keep-alive comments, and the end of the stream after ``end``/``error``.

Order matters: subscribe first, then replay the log, then relay live
messages, skipping what was already sent. An event published between the
replay and the first live read is therefore either in the log or on the
channel, never in neither.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import redis
from flask import current_app, request, stream_with_context
from flask_sse import Message, ServerSentEventsBlueprint

from api import lifecycle
from api.extensions import resources
from queue_schema import keys
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.eventlog import sse_message
from queue_schema.events import TERMINAL_TYPES

log = logging.getLogger(__name__)
SUBSCRIBE_WAIT_S = 5.0


class EventStreamBlueprint(ServerSentEventsBlueprint):
    @property
    def redis(self):
        return resources().redis

    def job_messages(self, job_id: str, after_seq: int, keepalive_s: float) -> Iterator[Message | str]:
        """Messages for one job after ``after_seq``; a comment string on silence."""
        eventlog = resources().eventlog
        pubsub = self.redis.pubsub()
        try:
            pubsub.subscribe(keys.job_channel(job_id))
            deadline = time.monotonic() + SUBSCRIBE_WAIT_S
            while time.monotonic() < deadline:  # the log is read only once the subscription is live
                m = pubsub.get_message(timeout=deadline - time.monotonic())
                if m and m["type"] == "subscribe":
                    break
            sent = after_seq
            for event in eventlog.replay(job_id, after_seq=sent):
                yield sse_message(event.model_dump_json(exclude_none=True), event.type, event.seq)
                sent = event.seq
                if event.terminal:
                    return
            last = eventlog.last(job_id)
            if last is not None and last.terminal and last.seq <= sent:
                return  # the client already has the end (Last-Event-ID at or past it)
            quiet_since = time.monotonic()
            while not lifecycle.stopping.is_set():
                m = pubsub.get_message(timeout=min(1.0, keepalive_s))
                if m is None or m["type"] != "message":
                    if time.monotonic() - quiet_since >= keepalive_s:
                        quiet_since = time.monotonic()
                        yield ": keep-alive\n\n"
                    continue
                message = Message(**json.loads(m["data"]))
                seq = int(message.id)
                if seq <= sent:
                    continue
                if seq > sent + 1:  # missed on the channel: back-fill from the log
                    for event in eventlog.replay(job_id, after_seq=sent, until_seq=seq - 1):
                        yield sse_message(event.model_dump_json(exclude_none=True), event.type, event.seq)
                yield message
                sent = seq
                quiet_since = time.monotonic()
                if message.type in TERMINAL_TYPES:
                    return
        finally:
            try:
                pubsub.close()
            except Exception:  # the connection may already be gone with the client
                pass

    def narration_messages(self, keepalive_s: float, backlog: int, follow: bool = True) -> Iterator[Message | str]:
        """Every job's and worker's narration: recent ones from the log, then live (if ``follow``)."""
        pubsub = self.redis.pubsub()
        try:
            pubsub.subscribe(keys.NARRATION_CHANNEL)
            for event in resources().eventlog.recent_narration(backlog):
                yield sse_message(event.model_dump_json(exclude_none=True), event.type, None)
            if not follow:
                return
            quiet_since = time.monotonic()
            while not lifecycle.stopping.is_set():
                m = pubsub.get_message(timeout=min(1.0, keepalive_s))
                if m is not None and m["type"] == "message":
                    quiet_since = time.monotonic()
                    yield Message(**json.loads(m["data"]))
                elif time.monotonic() - quiet_since >= keepalive_s:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
        finally:
            try:
                pubsub.close()
            except Exception:  # the connection may already be gone with the client
                pass

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
