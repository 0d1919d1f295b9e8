"""Submitting, listing, inspecting and cancelling jobs; each tenant sees only its own."""
from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify, request, url_for

from api import auth, background, memory, webhooks
from api import job_listing as listing
from api.extensions import resources
from queue_schema import keys
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle import books, leases, tenants
from queue_schema.lifecycle import views as jobs
from queue_schema.lifecycle.admission import Admitted, Idempotency
from queue_schema.lifecycle.eventlog import Appended
from queue_schema.lifecycle.tenants import Limits
from queue_schema.operations import JobAccepted, Operation, parse_operation

log = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 255
LIST_STATES = ("queued", "expired", "running", "finished", "failed", "cancelled")


def tenant_limits() -> Limits:
    cfg = current_app.config
    return Limits(float(cfg["SUBMITS_PER_S"]), int(cfg["SUBMIT_BURST"]), int(cfg["MAX_QUEUED_PER_TENANT"]),
                  int(cfg["MAX_RUNNING_PER_TENANT"]))


def idempotency(route: str, request_json: str) -> Idempotency | None:
    """The request's ``Idempotency-Key``, with a fingerprint of the route and the parsed request:
    the same key with another request is refused rather than answered with the first job."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise InferqError(ErrorCode.INVALID_REQUEST, f"{IDEMPOTENCY_HEADER} must be 1..{MAX_IDEMPOTENCY_KEY} "
                          "printable ASCII characters", errors=[{"field": IDEMPOTENCY_HEADER,
                                                                 "constraint": "format", "message": "bad key"}])
    return Idempotency.of(key, f"{route}\n{request_json}")


def check_webhook(url: str | None) -> None:
    if url is None:
        return
    problem = webhooks.url_problem(url, current_app.extensions["inferq_webhook_hosts"])
    if background.signing_key(current_app, auth.principal().name) is None:
        problem = ("cannot be called: webhooks are off for this tenant (neither INFERQ_WEBHOOK_SECRET nor an "
                   "entry of INFERQ_WEBHOOK_SECRETS signs its deliveries)")
    if problem is not None:
        raise InferqError(ErrorCode.INVALID_REQUEST, f"invalid request: webhook_url {problem}", errors=[
            {"field": "webhook_url", "constraint": "allowed_host", "message": f"webhook_url {problem}"}])


def submit(op: Operation, idem: Idempotency | None = None) -> Admitted:
    """Admit the job (infer or embed) for the caller's tenant (model and capability checks, limits,
    queue bound, enqueue, ``queued`` event: one atomic step), or find the one ``idem`` already made.
    Shared with the OpenAI routes."""
    auth.check_priority(op.priority)
    check_webhook(op.webhook_url)
    memory.check()
    res = resources()
    admitted = res.admission.admit(op, int(current_app.config["MAX_QUEUE_DEPTH"]), auth.principal().tenant,
                                   tenant_limits(), idem)
    if admitted.replayed:
        log.info("job %s: returned again for its idempotency key", admitted.job_id)
    else:
        log.info("job %s queued for %s at position %d", admitted.job_id, op.model, admitted.position)
    return admitted


def _accepted(job_id: str):
    body = JobAccepted(job_id=job_id, sse_url=url_for("stream.job_stream", job_id=job_id),
                       status_url=url_for("jobs.get_job", job_id=job_id))
    return jsonify(body.model_dump()), 202, {"Location": body.status_url}


@bp.post("/v1/jobs")
def create_job():
    """Submit; with an ``Idempotency-Key`` the same key (same tenant, 24 h) answers with the first job."""
    op = parse_operation(request.get_data())
    admitted = submit(op, idempotency("/v1/jobs", op.model_dump_json()))
    return _accepted(admitted.job_id)


@bp.get("/v1/jobs")
def list_jobs():
    """The caller's jobs, newest first (an admin's: everyone's, or one tenant's with ``tenant``)."""
    args = request.args
    state, model = args.get("state") or None, args.get("model") or None
    if state is not None and state not in LIST_STATES:
        raise InferqError(ErrorCode.INVALID_REQUEST, f"state must be one of {', '.join(LIST_STATES)}",
                          errors=[{"field": "state", "constraint": "enum", "message": "unknown state"}])
    try:
        limit = int(args.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise InferqError(ErrorCode.INVALID_REQUEST, "limit must be an integer from 1 to 100",
                          errors=[{"field": "limit", "constraint": "range", "message": "1..100"}])
    who = auth.principal()
    if who.admin and not args.get("tenant"):
        index = keys.JOB_INDEX
    else:
        tenant = args.get("tenant") if who.admin else who.name
        index = keys.tenant_jobs(tenant)
    found = listing.page(resources().redis, index, state=state, model=model, limit=limit,
                         cursor=args.get("cursor") or args.get("after"), events=resources().eventlog.redis)
    return jsonify(object="list", data=[v.to_dict() for v in found.data], has_more=found.has_more,
                   next_cursor=found.next_cursor)


@bp.post("/v1/inference")
def create_inference():
    """Deprecated alias of ``POST /v1/jobs``; ``operation`` may be left out."""
    op = parse_operation(request.get_data(), default_operation="infer")
    response, status, headers = _accepted(submit(op).job_id)
    headers.update({"Deprecation": "true", "Link": '</v1/jobs>; rel="successor-version"'})
    return response, status, headers


def check_owner(job_id: str) -> None:
    """404 for a job of another tenant, exactly as for one that does not exist."""
    if not auth.can_see(tenants.owner(resources().redis, job_id)):
        raise InferqError(ErrorCode.JOB_NOT_FOUND, f"no job {job_id!r} (unknown, or its log expired)")


def _view_or_404(job_id: str) -> jobs.JobView:
    res = resources()
    check_owner(job_id)
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
    return res.ending.end(jobs.cancelled_end(job_id, res.eventlog.next_seq(job_id))) == Appended.OK
