"""API settings and their defaults; each can be set as ``INFERQ_<NAME>`` in the environment."""
from __future__ import annotations

import os

from flask import Flask

from queue_schema.settings import DAY_S, RetryAfter, Settings

DEFAULTS = {
    "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    # Where the job logs and their live channels go (redis://, redis+sentinel://, redis+cluster://...); None
    # (unset): the queue's Redis (queue_schema/lifecycle/eventlog.py; docs/DESIGN.md, Scale-out).
    "EVENTS_URL": None,
    # Comma-separated `token` or `name:token` entries (api/auth.py); None (unset) turns auth off.
    "API_TOKENS": None,
    # Tokens that see every tenant's jobs, files and batches (same format; the name defaults to "admin").
    "ADMIN_TOKENS": None,
    # Comma-separated tenant names that may submit priority "high"; None (unset): everyone may.
    "HIGH_PRIORITY_TENANTS": None,
    # Comma-separated origins (scheme://host[:port]) trusted for writes besides the API's own
    # (a proxy that rewrites Host, say); see api/security.py.
    "TRUSTED_ORIGINS": None,
    # Comma-separated Host names answered while auth is off, besides loopback and the bind address
    # ("*": any); see api/hosts.py (DNS rebinding).
    "ALLOWED_HOSTS": None,
    "MAX_QUEUE_DEPTH": 1000,  # per model, on top of each worker's own --queue-depth
    # Per limit key (a tenant, a bare token, a client address with auth off), checked in the
    # admission script (queue_schema/lifecycle/tenants.py); 0 turns a limit off.
    "SUBMITS_PER_S": 0,
    "SUBMIT_BURST": 0,  # the token bucket's size; 0: twice the rate
    "MAX_QUEUED_PER_TENANT": 0,
    "MAX_RUNNING_PER_TENANT": 0,
    # Webhooks (api/webhooks.py): "whsec_" + base64 key, and the hosts a webhook_url may name.
    "WEBHOOK_SECRET": None,
    # Per-tenant keys, "tenant:whsec_...,..." (a tenant's deliveries are signed with its own, if given).
    "WEBHOOK_SECRETS": None,
    "WEBHOOK_ALLOW_HOSTS": None,
    "WEBHOOK_TIMEOUT_S": 5.0,  # the whole attempt: connect, send, the status line and headers
    "WEBHOOK_RETRY_BASE_S": 5.0,  # first retry after this; then doubling, up to an hour, for 24 h
    # Files and batches (api/file_store.py, api/batch_store.py); file bytes live in Redis.
    "FILE_MAX_BYTES": 8 << 20,
    "FILE_MAX_LINES": 10_000,
    "FILES_MAX_BYTES_PER_TENANT": 64 << 20,
    "FILE_TTL_S": 7 * 24 * 3600,
    "BATCH_WINDOW": 16,  # lines of one batch queued or running at once
    # Per tenant (api/batch_store.py): batches not yet ended, and the bytes of their results and of its
    # batch output files in Redis; past either, 429 (results past the bytes bound become quota errors).
    "MAX_BATCHES_PER_TENANT": 16,
    "BATCH_BYTES_PER_TENANT": 256 << 20,
    # Open SSE streams, per principal and per API process (api/limits.py). The process bound
    # stays below gunicorn's worker_connections (api/gunicorn_conf.py) so /health and
    # ordinary requests always find a free connection.
    "MAX_STREAMS_PER_TOKEN": 100,
    # Jobs of an OpenAI request without an Idempotency-Key: a worker that reaches one after it waited this
    # long ends it with TIMEOUT (its client, or its API process, is long gone). 0 turns the bound off.
    "OPENAI_QUEUE_TTL_S": 300,
    "MAX_STREAMS": 900,
    "KEEPALIVE_S": 15.0,  # SSE comment sent after this much silence
    "SSE_RETRY_MS": 2000,  # reconnect delay suggested to EventSource clients
    "MAX_CONTENT_LENGTH": 1 << 20,
    "JOB_TTL_S": DAY_S,  # a job's log, RQ hash and result live this long after it ends
    "LEASE_STALE_S": 8.0,  # a lease standing still this long is lost (queue_schema/settings.py)
    # Per API process. Streams share one pub/sub connection (api/fanout.py); other
    # requests borrow a pooled connection per command and wait (up to
    # REDIS_POOL_TIMEOUT_S) when all are busy, instead of opening more.
    "REDIS_MAX_CONNECTIONS": 64,
    "REDIS_POOL_TIMEOUT_S": 5.0,
    # With a maxmemory set on Redis: new work is refused (503 STORAGE_FULL) once used memory is within
    # this fraction of it, so that running jobs keep room to finish (api/memory.py).
    "REDIS_HEADROOM": 0.1,
}

# Lists of names and secrets, taken as written: from_prefixed_env would JSON-parse them, and
# `0`, `false`, `null` or `[]` would quietly turn auth off (`true` became the token `True`).
RAW_SETTINGS = ("EVENTS_URL", "API_TOKENS", "ADMIN_TOKENS", "HIGH_PRIORITY_TENANTS", "TRUSTED_ORIGINS", "ALLOWED_HOSTS",
                "WEBHOOK_SECRET", "WEBHOOK_SECRETS", "WEBHOOK_ALLOW_HOSTS")


def load_environment(app: Flask) -> None:
    """``INFERQ_*`` variables into ``app.config``: JSON-parsed, except ``RAW_SETTINGS``."""
    app.config.from_prefixed_env("INFERQ")
    for name in RAW_SETTINGS:
        raw = os.environ.get(f"INFERQ_{name}")
        if raw is not None:
            app.config[name] = raw


def csv_setting(value) -> list[str] | None:
    """A comma-separated setting (or a list, from test_config) as its stripped, non-empty items."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple, set, frozenset)) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def settings(app: Flask) -> Settings:
    """The settings the API shares with the workers, from its config (read once, at the app's start)."""
    return Settings(job_ttl_s=int(app.config["JOB_TTL_S"]), lease_stale_s=float(app.config["LEASE_STALE_S"]),
                    retry_after=RetryAfter())
