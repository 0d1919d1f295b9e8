"""Submitting, inspecting and cancelling jobs."""
from __future__ import annotations

import logging

import redis
from flask import Blueprint, current_app, jsonify, request, url_for
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from api import auth
from api.extensions import resources
from queue_schema import jobs, keys, stats
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.events import End
from queue_schema.operations import InferOperation, JobAccepted, parse_operation

log = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__)


def submit(op: InferOperation) -> tuple[str, dict]:
    """Check the model and the queue bound, then enqueue. Shared with the OpenAI routes."""
    auth.check_priority(op.priority)
    res = resources()
    snap = jobs.snapshot(res.redis, op.model)  # model, queue lengths and ETA inputs in one round trip
    if snap.model is None:
        raise InferqError(ErrorCode.MODEL_NOT_FOUND, f"no worker serves a model named {op.model!r}; "
                          "see GET /v1/models")
    bound = min(snap.model.queue_depth, int(current_app.config["MAX_QUEUE_DEPTH"]))
    if snap.depth >= bound:
        raise InferqError(ErrorCode.QUEUE_FULL, f"the queue for {op.model} is full ({bound} jobs); retry later",
                          retriable=True, headers={"Retry-After": "5"})
    job_id, queued = jobs.enqueue_infer(res.redis, res.eventlog, op, snap)
    log.info("job %s queued for %s at position %d", job_id, op.model, queued.position)
    return job_id, queued.model_dump()


def _accepted(job_id: str):
    body = JobAccepted(job_id=job_id, sse_url=url_for("stream.job_stream", job_id=job_id),
                       status_url=url_for("jobs.get_job", job_id=job_id))
    return jsonify(body.model_dump()), 202, {"Location": body.status_url}


@bp.post("/v1/jobs")
def create_job():
    op = parse_operation(request.get_data())
    job_id, _ = submit(op)
    return _accepted(job_id)


@bp.post("/v1/inference")
def create_inference():
    """Deprecated alias of ``POST /v1/jobs``; ``operation`` may be left out."""
    op = parse_operation(request.get_data(), default_operation="infer")
    job_id, _ = submit(op)
    response, status, headers = _accepted(job_id)
    headers.update({"Deprecation": "true", "Link": '</v1/jobs>; rel="successor-version"'})
    return response, status, headers


def _view_or_404(job_id: str) -> jobs.JobView:
    res = resources()
    view = jobs.view(res.redis, res.eventlog, job_id)
    if view is None:
        raise InferqError(ErrorCode.JOB_NOT_FOUND, f"no job {job_id!r} (unknown, or its log expired)")
    return view


@bp.get("/v1/jobs/<job_id>")
def get_job(job_id: str):
    return jsonify(_view_or_404(job_id).to_dict())


@bp.delete("/v1/jobs/<job_id>")
def cancel_job(job_id: str):
    """Cancel: a queued job at once, a running one cooperatively (the worker stops between tokens)."""
    view = _view_or_404(job_id)
    if view.terminal is not None or view.state in ("finished", "failed", "cancelled"):
        raise InferqError(ErrorCode.JOB_FINISHED, f"job {job_id} already ended ({view.state})")
    if request_cancel(job_id, view.state):
        return jsonify(job_id=job_id, state="cancelled")
    return jsonify(job_id=job_id, state="cancelling"), 202


def request_cancel(job_id: str, state: str) -> bool:
    """Cancel a job that has not ended; True if it ended at once (it was still queued)."""
    res = resources()
    # The flag covers a job a worker is about to take; the message reaches one already running.
    pipe = res.redis.pipeline(transaction=False)
    pipe.set(keys.job_cancel(job_id), 1, ex=24 * 3600)
    pipe.publish(keys.CANCEL_CHANNEL, job_id)
    pipe.execute()
    if state == "queued" and _cancel_queued(job_id):
        log.info("job %s cancelled while queued", job_id)
        return True
    log.info("job %s: cancel requested while running", job_id)
    return False


def _cancel_queued(job_id: str) -> bool:
    """End a queued job's stream ourselves; False if a worker got to it first."""
    res = resources()
    try:
        Job.fetch(job_id, connection=res.redis, serializer=JSONSerializer).cancel()
    except (InvalidJobOperation, NoSuchJobError):
        pass
    except ValueError:
        # RQ raises this when the job's execution vanishes mid-cancel: a worker
        # just took (or finished) it, so the cooperative cancel takes over.
        return False
    event = End(job_id=job_id, seq=res.eventlog.next_seq(job_id), tokens_out=0, decode_time_ms=0,
                stop_reason="cancelled", text="")
    try:
        ended = res.eventlog.append(event)
    except redis.ResponseError:  # the seq was taken: a worker started it meanwhile
        return False
    if ended:
        view = jobs.view(res.redis, res.eventlog, job_id)
        pipe = res.redis.pipeline(transaction=False)
        stats.count(pipe, "cancelled", (view.model if view else None) or "unknown")
        pipe.execute()
    return ended
