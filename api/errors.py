"""Every error leaves the API as JSON: ``{"error": {"code", "message", ...}}``, with the status its code maps to.

The contract's errors carry codes and facts (``retriable``, ``retry_after_s``);
HTTP is the API's business, and this module holds its one mapping: code ->
status, ``retry_after_s`` -> ``Retry-After``. The OpenAI routes answer the same
codes in OpenAI's shape (api/openai/errors.py), from the same table.

Redis being down, read-only, loading, full or failing to persist (what
``queue_schema.lifecycle.redis_errors.unavailable`` says) is a 503
``REDIS_UNAVAILABLE`` with ``Retry-After``; any other Redis error, like any
surprise, is a 500 ``INTERNAL`` whose traceback goes to the log, never to the
client.
"""
from __future__ import annotations

import logging
import math

import redis
from flask import Flask, current_app, jsonify
from werkzeug.exceptions import HTTPException

from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle.redis_errors import unavailable
from queue_schema.settings import DEFAULTS

log = logging.getLogger(__name__)

HTTP_STATUS = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.UNSUPPORTED_OPERATION: 400,
    ErrorCode.UNSUPPORTED_FEATURE: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN_ORIGIN: 403,
    ErrorCode.HOST_NOT_ALLOWED: 403,
    ErrorCode.ADMIN_ONLY: 403,
    ErrorCode.PRIORITY_NOT_ALLOWED: 403,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.TOO_MANY_STREAMS: 429,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TOO_MANY_QUEUED: 429,
    ErrorCode.TOO_MANY_RUNNING: 429,
    ErrorCode.IDEMPOTENCY_KEY_REUSED: 422,
    ErrorCode.FILE_NOT_FOUND: 404,
    ErrorCode.FILE_TOO_LARGE: 413,
    ErrorCode.BATCH_NOT_FOUND: 404,
    ErrorCode.BATCH_FINISHED: 409,
    ErrorCode.TOO_MANY_BATCHES: 429,
    ErrorCode.BATCH_QUOTA_EXCEEDED: 429,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.JOB_NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.JOB_FINISHED: 409,
    ErrorCode.JOB_UNREADABLE: 409,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.QUEUE_FULL: 503,
    ErrorCode.MODEL_OFFLINE: 503,
    ErrorCode.REDIS_UNAVAILABLE: 503,
    ErrorCode.STORAGE_FULL: 503,
}
_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED, 413: ErrorCode.INVALID_REQUEST,
               415: ErrorCode.UNSUPPORTED_MEDIA_TYPE, 400: ErrorCode.INVALID_REQUEST}


class HTTPError(InferqError):
    """An error whose answer needs a header of its own (``WWW-Authenticate``): the API's, not the contract's."""

    def __init__(self, code: ErrorCode, message: str, headers: dict[str, str]):
        super().__init__(code, message)
        self.headers = headers


def status_of(exc: InferqError) -> int:
    return HTTP_STATUS.get(exc.code, 500)


def headers_of(exc: InferqError) -> dict[str, str]:
    """``Retry-After`` from ``retry_after_s`` (whole seconds, at least 1), and an HTTPError's own."""
    out = dict(getattr(exc, "headers", {}))
    if exc.retry_after_s is not None:
        out["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return out


def body_of(exc: InferqError) -> dict:
    body: dict = {"code": exc.code.value, "message": exc.message}
    if exc.errors is not None:
        body["errors"] = exc.errors
    return {"error": body}


def redis_error(exc: redis.RedisError) -> InferqError | None:
    """What a Redis error means to a client: REDIS_UNAVAILABLE when Redis cannot take this now (a failover
    shows as READONLY or MASTERDOWN, a full or failing Redis as OOM or MISCONF, often from inside a Lua
    script: none of them the API's bug); None when it is a bug."""
    if not unavailable(exc):
        return None
    log.warning("redis unavailable: %s", exc)
    res = current_app.extensions.get("inferq")
    wait_s = (res.settings if res is not None else DEFAULTS).retry_after.redis_s
    return InferqError(ErrorCode.REDIS_UNAVAILABLE, "the queue (Redis) is unavailable; retry shortly",
                       retriable=True, retry_after_s=wait_s)


def error_response(code: ErrorCode, message: str, status: int, headers: dict | None = None, **extra):
    body = {"error": {"code": code.value, "message": message, **extra}}
    return jsonify(body), status, headers or {}


def _inferq(exc: InferqError):
    status = status_of(exc)
    if status >= 500:
        log.warning("%s: %s", exc.code.value, exc.message)
    return jsonify(body_of(exc)), status, headers_of(exc)


def _redis_error(exc: redis.RedisError):
    mapped = redis_error(exc)
    return _inferq(mapped) if mapped is not None else _unexpected(exc)


def _http(exc: HTTPException):
    code = _HTTP_CODES.get(exc.code, ErrorCode.INVALID_REQUEST if exc.code < 500 else ErrorCode.INTERNAL)
    return error_response(code, exc.description or exc.name, exc.code)


def _unexpected(exc: Exception):
    log.exception("unhandled error")
    return error_response(ErrorCode.INTERNAL, "internal error; see the API log", 500)


def init_app(app: Flask) -> None:
    app.register_error_handler(InferqError, _inferq)
    app.register_error_handler(redis.RedisError, _redis_error)
    app.register_error_handler(HTTPException, _http)
    app.register_error_handler(Exception, _unexpected)
