"""Server-Sent Events routes: a job's stream and the operators' narration feed.

The relay (api/relay.py) decides what to send; this module is the HTTP side:
``Last-Event-ID``, the response, and a Redis failure mid-stream ending the
stream quietly (the status line is long sent; the client resumes from the log).
"""
from __future__ import annotations

import json
import logging

import redis
from flask import Blueprint, current_app, request, stream_with_context

from api import auth, limits, relay, sse
from api.extensions import resources
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle import tenants

log = logging.getLogger(__name__)
bp = Blueprint("stream", __name__)
MAX_SEQ = 2**53  # far past any job's last event, and exact in every client's JSON numbers


@bp.get("/v1/jobs/<job_id>/stream")
def job_stream(job_id: str):
    res = resources()
    if not res.eventlog.exists(job_id) or not auth.can_see(tenants.owner(res.redis, job_id)):
        raise InferqError(ErrorCode.JOB_NOT_FOUND, f"no event log for job {job_id!r} (unknown, or expired)")
    after = _last_event_id()
    end = res.eventlog.next_seq(job_id) if after >= 0 else -1  # a fresh stream cannot be ahead of the log
    if 0 <= end <= after:
        # The client read events this log does not hold: a failover lost them, and what the client has may be
        # of a run that is gone. Going on from its seq would splice two runs; it is told to read again.
        return sse_response(iter([restart(job_id, after, end)]), f"the stream of job {job_id}")
    keepalive = float(current_app.config["KEEPALIVE_S"])
    return sse_response(relay.job_messages(job_id, after, keepalive), f"the stream of job {job_id}")


def restart(job_id: str, after: int, end: int) -> str:
    """The restart marker: not an event of the log (no seq, no SSE id), the one thing such a stream sends."""
    return sse.frame(json.dumps({
        "type": "restart", "job_id": job_id, "last_event_id": after, "log_end": end,
        "message": f"the log holds events up to {end - 1}, not the {after} this client read (a Redis failover "
                   "lost the rest): drop what was read and read the stream again from the start"}), "restart")


@bp.get("/v1/narration")
def narration():
    """The operators' feed: narration of all jobs and workers, as SSE (never ends)."""
    backlog = min(max(request.args.get("backlog", 20, type=int), 0), 1000)
    follow = request.args.get("follow", "true").lower() not in ("0", "false", "no")
    keepalive = float(current_app.config["KEEPALIVE_S"])
    return sse_response(relay.narration_messages(keepalive, backlog, follow), "the narration feed")


def sse_response(messages, what: str):
    """An event-stream response for ``messages``; a Redis failure ends it quietly.

    It holds one of the principal's stream slots (api/limits.py) until the server
    closes the response: at its end, or when a write finds the client gone.
    """
    retry_ms = int(current_app.config["SSE_RETRY_MS"])
    release = limits.stream_slot()

    @stream_with_context
    def generate():
        yield sse.retry(retry_ms)
        try:
            yield from messages
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("%s ended: redis unavailable (%s)", what, exc)

    try:
        response = current_app.response_class(generate(), mimetype="text/event-stream",
                                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    except BaseException:
        release()
        raise
    # Not the generator's finally: a generator closed before its first step never runs it.
    response.call_on_close(release)
    return response


def _last_event_id() -> int:
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if raw is None or raw == "":
        return -1
    try:
        value = int(raw)
    except ValueError:
        raise InferqError(ErrorCode.INVALID_REQUEST, "Last-Event-ID must be an event seq (an integer)") from None
    if not -1 <= value <= MAX_SEQ:
        raise InferqError(ErrorCode.INVALID_REQUEST, f"Last-Event-ID must be between -1 and {MAX_SEQ}")
    return value
