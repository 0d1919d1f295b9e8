"""Error codes and the one exception root for inferq."""
from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    # Request errors, answered by the API.
    INVALID_JSON = "INVALID_JSON"
    INVALID_REQUEST = "INVALID_REQUEST"
    UNSUPPORTED_OPERATION = "UNSUPPORTED_OPERATION"
    # The model's workers cannot do what the job asks (a grammar, logprobs, embeddings): registry capabilities.
    UNSUPPORTED_FEATURE = "UNSUPPORTED_FEATURE"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN_ORIGIN = "FORBIDDEN_ORIGIN"  # a write from another site's page (CSRF)
    HOST_NOT_ALLOWED = "HOST_NOT_ALLOWED"  # auth off and a Host that is not this machine (DNS rebinding)
    ADMIN_ONLY = "ADMIN_ONLY"  # rq-dashboard with auth on and no admin token configured
    PRIORITY_NOT_ALLOWED = "PRIORITY_NOT_ALLOWED"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
    # A tenant's limits (queue_schema.lifecycle.tenants), sent with Retry-After.
    RATE_LIMITED = "RATE_LIMITED"
    TOO_MANY_QUEUED = "TOO_MANY_QUEUED"
    TOO_MANY_RUNNING = "TOO_MANY_RUNNING"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"  # one key, two different requests
    FILE_NOT_FOUND = "FILE_NOT_FOUND"
    FILE_TOO_LARGE = "FILE_TOO_LARGE"
    BATCH_NOT_FOUND = "BATCH_NOT_FOUND"
    BATCH_FINISHED = "BATCH_FINISHED"
    TOO_MANY_BATCHES = "TOO_MANY_BATCHES"  # a tenant's batches in flight at their bound
    BATCH_QUOTA_EXCEEDED = "BATCH_QUOTA_EXCEEDED"  # a tenant's batch results and outputs at their bound
    NOT_FOUND = "NOT_FOUND"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    JOB_FINISHED = "JOB_FINISHED"
    JOB_UNREADABLE = "JOB_UNREADABLE"  # stored data that is not JSON: never decoded
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    QUEUE_FULL = "QUEUE_FULL"
    # Known (served within registry.MODEL_TTL_S) but no live worker takes jobs now; sent with Retry-After.
    MODEL_OFFLINE = "MODEL_OFFLINE"
    REDIS_UNAVAILABLE = "REDIS_UNAVAILABLE"
    STORAGE_FULL = "STORAGE_FULL"  # Redis near its maxmemory: new work waits, running jobs finish
    INTERNAL = "INTERNAL"
    # Job errors, carried by `error` events (and also some API answers).
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    CONTEXT_LENGTH_EXCEEDED = "CONTEXT_LENGTH_EXCEEDED"
    WORKER_LOST = "WORKER_LOST"
    TIMEOUT = "TIMEOUT"
    VRAM_OOM = "VRAM_OOM"
    INFERENCE_FAILED = "INFERENCE_FAILED"
    CANCELLED = "CANCELLED"


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


class InferqError(Exception):
    """Root of every error inferq raises on purpose; ``code`` says which."""

    def __init__(self, code: ErrorCode, message: str, *, retriable: bool = False,
                 errors: list[dict] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.retriable = retriable
        self.errors = errors
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def to_dict(self) -> dict:
        body: dict = {"code": self.code.value, "message": self.message}
        if self.errors is not None:
            body["errors"] = self.errors
        return {"error": body}


class EventDecodeError(InferqError):
    """Bytes from Redis that are not a valid event: a bug or a version skew."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.INTERNAL, message)
