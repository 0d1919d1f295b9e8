"""Submitting, inspecting and cancelling jobs."""
from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify, request, url_for

from api import auth
from api.extensions import resources
from queue_schema import books, jobs, keys, leases, stats
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.eventlog import Appended
from queue_schema.operations import JobAccepted, Operation, parse_operation

log = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__)


def submit(op: Operation) -> tuple[str, int]:
    """Admit the job (model and capability checks, queue bound, enqueue, ``queued`` event: one atomic step).
    Shared with the OpenAI routes; returns the job id and its queue position."""
    auth.check_priority(op.priority)
    res = resources()
    admitted = res.admission.admit(op, int(current_app.config["MAX_QUEUE_DEPTH"]))
    log.info("job %s queued for %s at position %d", admitted.job_id, op.model, admitted.position)
    return admitted.job_id, admitted.position


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
    """End a queued job's stream ourselves; False if a worker holds it (the worker ends it)."""
    res = resources()
    job = books.fetch(res.redis, job_id)
    if job is None or leases.cancel_queued(res.redis, job_id, job.origin) != 1:
        return False
    ended = res.eventlog.append(jobs.cancelled_end(job_id, res.eventlog.next_seq(job_id))) == Appended.OK
    pipe = res.redis.pipeline(transaction=False)
    books.cancelled(pipe, job)
    if ended:
        stats.count(pipe, "cancelled", job.meta.get("model") or "unknown")
    pipe.execute()
    return ended
