"""Which Redis errors mean "Redis cannot take this now" (retry later) rather than a bug.

A lost connection, a time-out, a Redis still loading its data, a replica
that became read-only in a failover, ``maxmemory`` reached, a failed
snapshot (MISCONF): the API answers these with 503 and ``Retry-After``, and
workers hold their events and retry. Anything else is a real error.
"""
from __future__ import annotations

import redis

_TRANSIENT_TYPES = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
                    redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError)
_TRANSIENT_PREFIXES = ("MISCONF", "LOADING", "READONLY", "OOM", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN",
                       "CLUSTERDOWN", "NOTREADY")


def unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).upper().startswith(_TRANSIENT_PREFIXES)
