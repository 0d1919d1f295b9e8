"""Counters and histograms that workers and the API keep in Redis for ``/metrics``.

Keeping them in Redis (not in process memory) makes them the same whichever
gunicorn process is scraped and whichever worker did the work, and lets the
numbers survive process restarts.
"""
from __future__ import annotations

import time
from collections import defaultdict

import redis

from queue_schema import keys
from queue_schema.lifecycle import scripts

COUNTERS = ("submitted", "finished", "failed", "cancelled", "tokens", "stuck_steps")
BUCKETS = {
    "ttft_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    "queue_wait_seconds": (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
}
RATE_KEY = "job_seconds_ewma"  # per-model recent job duration, for queue ETAs


def count(pipe, counter: str, model: str, n: int = 1) -> None:
    pipe.hincrby(keys.COUNTERS, f"{counter}|{model}", n)


def observe(pipe, name: str, model: str, value: float) -> None:
    """Two commands: the one bucket the value falls in (``b:<bound>``, ``b:+Inf`` past the last) and the sum.
    Prometheus's buckets are cumulative; they are summed at scrape time (``read_histogram``), not written as
    one HINCRBY per bound the value is under (13 per observation, two observations per job)."""
    observe_at(pipe, keys.histogram(name, model), BUCKETS[name], value)


def observe_at(pipe, key: str, bounds: tuple[float, ...], value: float) -> None:
    """``observe`` into the histogram hash at ``key`` with these bucket bounds (one not kept per model)."""
    bucket = next((str(bound) for bound in bounds if value <= bound), "+Inf")
    pipe.hincrby(key, f"b:{bucket}", 1)
    pipe.hincrbyfloat(key, "sum", value)


def record_run(client: redis.Redis, model: str, tokens: int, ttft_s: float | None, wait_s: float | None,
               duration_s: float | None) -> None:
    """One round trip once a worker settled a job it ran: tokens, timings, and the ETA average (its outcome
    is counted by the settle itself, whoever settles it)."""
    pipe = client.pipeline(transaction=False)
    if tokens:
        count(pipe, "tokens", model, tokens)
    if ttft_s is not None:
        observe(pipe, "ttft_seconds", model, ttft_s)
    if wait_s is not None:
        observe(pipe, "queue_wait_seconds", model, wait_s)
    if duration_s is not None:
        update_job_seconds(pipe, model, duration_s)
    pipe.execute()


_EWMA = scripts.load("stats_ewma")


def update_job_seconds(client, model: str, seconds: float, weight: float = 0.2) -> None:
    """Fold ``seconds`` into the model's moving average (``client`` may be a pipeline)."""
    _EWMA(client, {"average": keys.histogram(RATE_KEY, model)},
          {"value": repr(seconds), "weight": repr(weight), "at": repr(time.time())})


def job_seconds(client: redis.Redis, model: str) -> float | None:
    raw = client.hget(keys.histogram(RATE_KEY, model), "value")
    return float(raw) if raw is not None else None


def read_counters(client: redis.Redis) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for field, value in client.hgetall(keys.COUNTERS).items():
        counter, _, model = field.decode().partition("|")
        out[counter][model] = int(value)
    return out


def read_histogram(client: redis.Redis, name: str, model: str) -> tuple[list[tuple[str, int]], float] | None:
    return read_histogram_at(client, keys.histogram(name, model), BUCKETS[name])


def read_histogram_at(client: redis.Redis, key: str,
                      bounds: tuple[float, ...]) -> tuple[list[tuple[str, int]], float] | None:
    """Prometheus's cumulative buckets and the sum of the histogram hash at ``key``; None before any value."""
    raw = client.hgetall(key)
    if not raw:
        return None
    values = {k.decode(): v for k, v in raw.items()}
    # Fields "<bound>" and "+Inf" are the cumulative counts that older versions wrote: they add to what the
    # per-bucket fields "b:<bound>" sum up to, so an upgrade keeps its history.
    buckets, running = [], 0
    for bound in [*map(str, bounds), "+Inf"]:
        running += int(values.get(f"b:{bound}", 0))
        buckets.append((bound, running + int(values.get(bound, 0))))
    return buckets, float(values.get("sum", 0.0))
