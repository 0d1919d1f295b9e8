"""How far behind webhook delivery is, kept in Redis so that every API process's ``/metrics`` reads the same.

The due set alone cannot say it: a delivery is due at its event's time only until its first attempt; an
attempt in flight takes it off the due set, and a failed one puts it back at its retry's time. So the
first claim records the event's time in ``keys.WEBHOOKS_UNDELIVERED`` until the delivery ends, and the
oldest undelivered webhook is the earlier of that set's head and the due set's (a delivery never claimed
yet is due at its event's time: the terminal append and a batch's end schedule it so).
"""
from __future__ import annotations

import redis

from queue_schema import keys
from queue_schema.lifecycle import stats

# From a delivery on the next tick to one that waited out a day of retries.
BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


def claimed(pipe, delivery_id: str, event_ms: int) -> None:
    pipe.zadd(keys.WEBHOOKS_UNDELIVERED, {delivery_id: event_ms}, nx=True)


def ended(pipe, delivery_id: str) -> None:
    """Delivered, given up on, or its record gone."""
    pipe.zrem(keys.WEBHOOKS_UNDELIVERED, delivery_id)


def delivered(pipe, delivery_id: str, event_ms: int, now_ms: int) -> None:
    ended(pipe, delivery_id)
    if event_ms > 0:  # a record from before "created" was kept has no event time to measure from
        stats.observe_at(pipe, keys.WEBHOOK_DELIVERY_HIST, BUCKETS, max(0.0, (now_ms - event_ms) / 1000))


def forget_before(pipe, before_ms: int) -> None:
    """Entries whose record has expired by now: a delivery the reaper dropped from the due set ends nowhere else."""
    pipe.zremrangebyscore(keys.WEBHOOKS_UNDELIVERED, "-inf", f"({before_ms}")


def oldest_event_ms(client: redis.Redis) -> float | None:
    """When the event of the oldest webhook not yet delivered happened (ms); None when none waits."""
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.WEBHOOKS_DUE, 0, 0, withscores=True)
    pipe.zrange(keys.WEBHOOKS_UNDELIVERED, 0, 0, withscores=True)
    heads = [head[0][1] for head in pipe.execute() if head]
    return min(heads) if heads else None


def histogram(client: redis.Redis) -> tuple[list[tuple[str, int]], float] | None:
    """Prometheus's cumulative buckets and the sum, or None before any delivery."""
    return stats.read_histogram_at(client, keys.WEBHOOK_DELIVERY_HIST, BUCKETS)
