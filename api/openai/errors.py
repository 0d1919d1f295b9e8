"""Errors in OpenAI's shape, ``{"error": {"message", "type", "code", "param"}}``: one mapping for the routes,
their streams and batch lines.

The status is the one api/errors.py gives a code, except where OpenAI's own
routes differ: a body they cannot read is a 400 (``invalid_value``, naming the
``param``), and a job that failed after it was admitted is answered by what
failed (400 for a request the model could not take, 504 for a timeout, else
500) with ``x-should-retry: false``: the official SDKs retry 5xx answers on
their own, and a retry is a new job, so a lost job would otherwise run twice.
"""
from __future__ import annotations

import logging

import redis
from flask import Blueprint, jsonify

from api import errors as api_errors
from queue_schema.errors import ErrorCode, InferqError

log = logging.getLogger(__name__)
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
         415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}
NO_RETRY = {"x-should-retry": "false"}
# A job's own failure (its terminal error event's code): what the answer's status says about it.
_JOB_STATUS = {ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400, ErrorCode.INVALID_REQUEST: 400, ErrorCode.TIMEOUT: 504}


class OpenAIError(InferqError):
    """An error OpenAI's routes answer with a status and code of their own (see the module's docstring)."""

    def __init__(self, code: ErrorCode, message: str, status: int, param: str | None = None,
                 openai_code: str | None = None, ran: bool = False):
        super().__init__(code, message, errors=[{"field": param, "constraint": "openai", "message": message}]
                         if param else None)
        self.status, self.param, self.openai_code, self.ran = status, param, openai_code, ran


def invalid(param: str | None, message: str, openai_code: str = "invalid_value") -> OpenAIError:
    """A request OpenAI would refuse: 400 naming ``param``."""
    return OpenAIError(ErrorCode.INVALID_REQUEST, message, 400, param, openai_code)


def job_failed(event: dict) -> OpenAIError:
    """The answer to a job whose log ended with ``event`` (an ``error``): it ran, so no automatic retry."""
    code = ErrorCode(event["code"])
    return OpenAIError(code, event["message"], _JOB_STATUS.get(code, 500), openai_code=code.value.lower(), ran=True)


def interrupted(job_id: str) -> OpenAIError:
    return OpenAIError(ErrorCode.REDIS_UNAVAILABLE, f"the response was cut off before the job ended (the API "
                       f"process is stopping, or lost Redis); the job itself goes on: GET /v1/jobs/{job_id}", 503,
                       openai_code="stream_interrupted", ran=True)


def restarted(job_id: str) -> OpenAIError:
    return OpenAIError(ErrorCode.WORKER_LOST, f"job {job_id} began again on a worker after part of its answer was "
                       "sent (its earlier run was lost): the answer so far is void; send the request again", 500,
                       openai_code="job_restarted", ran=True)


def cancelled() -> OpenAIError:
    return OpenAIError(ErrorCode.CANCELLED, "the job was cancelled", 500, openai_code="cancelled", ran=True)


def body(status: int, message: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "code": code, "param": param}}


def answer(exc: InferqError) -> tuple[int, dict, dict]:
    """(status, body, headers) of any inferq error in OpenAI's shape."""
    if isinstance(exc, OpenAIError):
        status, code, param = exc.status, exc.openai_code or exc.code.value.lower(), exc.param
        headers = dict(NO_RETRY) if exc.ran else {}
    else:
        status = api_errors.status_of(exc)
        code = "model_not_found" if exc.code == ErrorCode.MODEL_NOT_FOUND else exc.code.value.lower()
        param = exc.errors[0]["field"] if exc.errors else None
        headers = api_errors.headers_of(exc)
    return status, body(status, exc.message, code, param), headers


def _inferq_error(exc: InferqError):
    status, payload, headers = answer(exc)
    return jsonify(payload), status, headers


def _redis_error(exc: redis.RedisError):
    mapped = api_errors.redis_error(exc)
    if mapped is None:  # a Redis error that is a bug (a bad command, a script error): not a 503
        log.exception("unhandled Redis error")
        return jsonify(body(500, "internal error; see the API log", "internal_error")), 500
    return _inferq_error(mapped)


def install(blueprint: Blueprint) -> None:
    """Errors in OpenAI's shape on ``blueprint``'s routes (the OpenAI routes, files, batches)."""
    blueprint.register_error_handler(InferqError, _inferq_error)
    blueprint.register_error_handler(redis.RedisError, _redis_error)  # 503 only when Redis is unavailable
