"""Every error leaves the API as JSON: ``{"error": {"code", "message", ...}}``.

Redis being down is a 503 ``REDIS_UNAVAILABLE``; a surprise is a 500
``INTERNAL`` whose traceback goes to the log, never to the client.
"""
from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from queue_schema.errors import ErrorCode, InferqError

log = logging.getLogger(__name__)
_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED, 413: ErrorCode.INVALID_REQUEST,
               415: ErrorCode.UNSUPPORTED_MEDIA_TYPE, 400: ErrorCode.INVALID_REQUEST}


def error_response(code: ErrorCode, message: str, status: int, headers: dict | None = None, **extra):
    body = {"error": {"code": code.value, "message": message, **extra}}
    return jsonify(body), status, headers or {}


def _inferq(exc: InferqError):
    if exc.status >= 500:
        log.warning("%s: %s", exc.code.value, exc.message)
    return jsonify(exc.to_dict()), exc.status, exc.headers


def _redis_down(exc: redis.RedisError):
    log.warning("redis unavailable: %s", exc)
    return error_response(ErrorCode.REDIS_UNAVAILABLE, "the queue (Redis) is unavailable; retry shortly", 503,
                          {"Retry-After": "2"})


def _http(exc: HTTPException):
    code = _HTTP_CODES.get(exc.code, ErrorCode.INVALID_REQUEST if exc.code < 500 else ErrorCode.INTERNAL)
    return error_response(code, exc.description or exc.name, exc.code)


def _unexpected(exc: Exception):
    log.exception("unhandled error")
    return error_response(ErrorCode.INTERNAL, "internal error; see the API log", 500)


def init_app(app: Flask) -> None:
    app.register_error_handler(InferqError, _inferq)
    app.register_error_handler(redis.ConnectionError, _redis_down)
    app.register_error_handler(redis.TimeoutError, _redis_down)
    app.register_error_handler(redis.exceptions.BusyLoadingError, _redis_down)
    app.register_error_handler(HTTPException, _http)
    app.register_error_handler(Exception, _unexpected)
