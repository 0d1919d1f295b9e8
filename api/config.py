"""API settings and their defaults; each can be set as ``INFERQ_<NAME>`` in the environment."""
from __future__ import annotations

import os

from queue_schema.eventlog import DEFAULT_TTL_S

DEFAULTS = {
    "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    "API_TOKENS": "",  # comma-separated bearer tokens; empty turns auth off
    "MAX_QUEUE_DEPTH": 1000,  # per model, on top of each worker's own --queue-depth
    "KEEPALIVE_S": 15.0,  # SSE comment sent after this much silence
    "SSE_RETRY_MS": 2000,  # reconnect delay suggested to EventSource clients
    "MAX_CONTENT_LENGTH": 1 << 20,
    "JOB_TTL_S": DEFAULT_TTL_S,  # a job's log, RQ hash and result live this long after it ends
    # Per API process. Streams share one pub/sub connection (api/fanout.py); other
    # requests borrow a pooled connection per command and wait (up to
    # REDIS_POOL_TIMEOUT_S) when all are busy, instead of opening more.
    "REDIS_MAX_CONNECTIONS": 64,
    "REDIS_POOL_TIMEOUT_S": 5.0,
}
