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
    CONFIG_INVALID = "CONFIG_INVALID"  # a setting a process cannot start with
    START_FAILED = "START_FAILED"  # a process cannot start: a device, a file, Redis
    # A worker could not load its model file (damaged, unknown architecture, out of memory). Reported as
    # MODEL_NOT_FOUND until 2026-12, which sent operators looking for a missing file.
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    # Job errors, carried by `error` events (and also some API answers).
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    CONTEXT_LENGTH_EXCEEDED = "CONTEXT_LENGTH_EXCEEDED"
    WORKER_LOST = "WORKER_LOST"
    TIMEOUT = "TIMEOUT"
    VRAM_OOM = "VRAM_OOM"
    INFERENCE_FAILED = "INFERENCE_FAILED"
    CANCELLED = "CANCELLED"


class InferqError(Exception):
    """Root of every error inferq raises on purpose; ``code`` says which.

    The contract carries facts, not HTTP: ``retriable`` (the same request may
    succeed later) and ``retry_after_s`` (when), ``errors`` (per field, for
    validation). The API maps codes to statuses and headers (api/errors.py).
    """

    code_default: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, code: ErrorCode | None = None, message: str = "", *, retriable: bool = False,
                 errors: list[dict] | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = ErrorCode(code or self.code_default)
        self.message = message
        self.retriable = retriable
        self.errors = errors
        self.retry_after_s = retry_after_s


class CodedError(InferqError):
    """An error whose class fixes its code: raised with its message only (``raise ConfigError("...")``)."""

    def __init__(self, message: str = ""):
        super().__init__(None, message)


class ConfigError(CodedError):
    """A setting a process cannot start with; the message is one line naming it."""

    code_default = ErrorCode.CONFIG_INVALID


class StartError(CodedError):
    """A process cannot start (a device, a model file, Redis, a port); the message is one line for the operator."""

    code_default = ErrorCode.START_FAILED


class EventDecodeError(InferqError):
    """Bytes from Redis that are not a valid event: a bug or a version skew."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.INTERNAL, message)
