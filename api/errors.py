"""Every error leaves the API as JSON: ``{"error": {"code", "message", ...}}``.

Redis being down, read-only, loading, full or failing to persist (what
``queue_schema.lifecycle.redis_errors.unavailable`` says) is a 503 ``REDIS_UNAVAILABLE``
with ``Retry-After``; any other Redis error, like any surprise, is a 500
``INTERNAL`` whose traceback goes to the log, never to the client.
"""
from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle.redis_errors import unavailable

log = logging.getLogger(__name__)
_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED, 413: ErrorCode.INVALID_REQUEST,
               415: ErrorCode.UNSUPPORTED_MEDIA_TYPE, 400: ErrorCode.INVALID_REQUEST}
RETRY_AFTER_S = "2"  # a Sentinel failover takes a few seconds; a restart about as long


def error_response(code: ErrorCode, message: str, status: int, headers: dict | None = None, **extra):
    body = {"error": {"code": code.value, "message": message, **extra}}
    return jsonify(body), status, headers or {}


def _inferq(exc: InferqError):
    if exc.status >= 500:
        log.warning("%s: %s", exc.code.value, exc.message)
    return jsonify(exc.to_dict()), exc.status, exc.headers


def _redis_error(exc: redis.RedisError):
    # One test for "Redis cannot take this now", shared with the workers' retries: a failover
    # shows as READONLY or MASTERDOWN, a full or failing Redis as OOM or MISCONF, often from
    # inside a Lua script, and none of them is the API's bug.
    if not unavailable(exc):
        return _unexpected(exc)
    log.warning("redis unavailable: %s", exc)
    return redis_unavailable()


def redis_unavailable():
    """The 503 every route answers while Redis cannot take commands."""
    return error_response(ErrorCode.REDIS_UNAVAILABLE, "the queue (Redis) is unavailable; retry shortly", 503,
                          {"Retry-After": RETRY_AFTER_S})


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
