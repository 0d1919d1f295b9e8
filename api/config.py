"""API settings and their defaults; each can be set as ``INFERQ_<NAME>`` in the environment."""
from __future__ import annotations

import os

DEFAULTS = {
    "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    "API_TOKENS": "",  # comma-separated bearer tokens; empty turns auth off
    "MAX_QUEUE_DEPTH": 1000,  # per model, on top of each worker's own --queue-depth
    "KEEPALIVE_S": 15.0,  # SSE comment sent after this much silence
    "SSE_RETRY_MS": 2000,  # reconnect delay suggested to EventSource clients
    "MAX_CONTENT_LENGTH": 1 << 20,
    "EVENT_TTL_S": 24 * 3600,
    # Each open SSE stream holds one pub/sub connection; redis-py's default pool
    # (100) would cap a process at ~100 watchers.
    "REDIS_MAX_CONNECTIONS": 10000,
}
