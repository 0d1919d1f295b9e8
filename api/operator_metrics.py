"""``/metrics`` families that show the one Redis primary's limits coming, and webhook delivery falling behind.

All of it is read from Redis at scrape time, so every API process answers the same and none counts another's
work. The one thing a process keeps is its own recent samples of Redis's CPU and the fleet's tokens, for the
per-token gauge: both are Redis-wide totals, so the ratio over any process's window is the fleet's.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from api import webhook_lag
from queue_schema import keys
from queue_schema.lifecycle import clock

WINDOW_S = 300.0

CPU_PER_TOKEN_HELP = (
    "Seconds of the queue's Redis CPU per generated token, over this API process's scrapes of the last 5 min "
    "(since its previous scrape if that was longer ago); absent until a process has scraped twice with tokens "
    "generated in between. Over any range: max(rate(inferq_redis_cpu_seconds_total[5m])) / "
    "sum(max by (model) (rate(inferq_tokens_generated_total[5m]))), max because every API process reports the "
    "same Redis-wide totals. 1 / this is the tok/s one Redis core carries")
MAXMEMORY_HELP = ("The queue's Redis maxmemory in bytes; 0 is no limit: Redis grows until the host runs out of "
                  "memory and admission never refuses for memory (set one, with maxmemory-policy noeviction)")


class RedisCost:
    """Redis CPU seconds per generated token over this process's recent scrapes."""

    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self._samples: deque[tuple[float, float, int]] = deque(maxlen=4096)
        self._lock = threading.Lock()  # the threaded dev server scrapes from several threads

    def per_token(self, cpu_s: float, tokens: int, at: float | None = None) -> float | None:
        at = time.monotonic() if at is None else at
        with self._lock:
            if self._samples and (cpu_s < self._samples[-1][1] or tokens < self._samples[-1][2]):
                self._samples.clear()  # Redis restarted, or its counters were wiped: an interval across it lies
            self._samples.append((at, cpu_s, tokens))
            while len(self._samples) > 2 and at - self._samples[0][0] > self.window_s:
                self._samples.popleft()
            _, cpu_then, tokens_then = self._samples[0]
        generated = tokens - tokens_then
        return (cpu_s - cpu_then) / generated if generated > 0 else None


def redis_families(r: redis.Redis, tokens: int, cost: RedisCost | None = None, headroom: float = 0.0):
    """What the queue's Redis spends, beside ``tokens``, the fleet's generated-token total."""
    pipe = r.pipeline(transaction=False)
    for section in ("cpu", "memory", "stats"):
        pipe.info(section)
    cpu, memory, stats_info = pipe.execute()
    cpu_s = float(cpu.get("used_cpu_user", 0)) + float(cpu.get("used_cpu_sys", 0))
    total = CounterMetricFamily("inferq_redis_cpu_seconds", "CPU the queue's Redis has used (user and system, "
                                "its own process: not a BGSAVE's or AOF rewrite's child)")
    total.add_metric([], cpu_s)
    yield total
    per_token = cost.per_token(cpu_s, tokens) if cost is not None else None
    if per_token is not None:
        gauge = GaugeMetricFamily("inferq_redis_cpu_per_token_seconds", CPU_PER_TOKEN_HELP)
        gauge.add_metric([], per_token)
        yield gauge
    commands = CounterMetricFamily("inferq_redis_commands", "Commands the queue's Redis has run")
    commands.add_metric([], int(stats_info.get("total_commands_processed", 0)))
    yield commands
    used_bytes, limit_bytes = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
    yield GaugeMetricFamily("inferq_redis_used_memory_bytes", "Memory the queue's Redis uses", value=used_bytes)
    yield GaugeMetricFamily("inferq_redis_maxmemory_bytes", MAXMEMORY_HELP, value=limit_bytes)
    if limit_bytes:  # a ratio of no limit would read as always 0 % full
        yield GaugeMetricFamily("inferq_redis_memory_used_ratio", "used_memory / maxmemory of the queue's Redis "
                                "(present only while a maxmemory is set)", value=used_bytes / limit_bytes)
        if headroom > 0:
            yield GaugeMetricFamily("inferq_redis_memory_refuse_ratio", "The inferq_redis_memory_used_ratio from "
                                    "which admission refuses new work with 503 STORAGE_FULL "
                                    "(1 - INFERQ_REDIS_HEADROOM)", value=1 - headroom)


def webhook_families(r: redis.Redis):
    now = clock.now_ms(r)
    pipe = r.pipeline()  # one snapshot: a claim moves a delivery from one set to the other
    pipe.zrange(keys.WEBHOOKS_DUE, 0, 0, withscores=True)
    pipe.zcard(keys.WEBHOOKS_DUE)
    pipe.zcard(keys.WEBHOOKS_CLAIMED)
    due, pending, in_flight = pipe.execute()
    yield GaugeMetricFamily("inferq_webhook_delivery_lag_seconds", "How long the oldest webhook delivery that is "
                            "due has waited for a sender (0: none waits): grows when senders are all busy",
                            value=max(0.0, (now - due[0][1]) / 1000) if due else 0.0)
    oldest = webhook_lag.oldest_event_ms(r)
    yield GaugeMetricFamily("inferq_webhook_oldest_undelivered_age_seconds", "Time since the event of the oldest "
                            "webhook not yet delivered nor given up on, retries and attempts in flight included "
                            "(0: none): grows while a receiver is down or stalls",
                            value=max(0.0, (now - oldest) / 1000) if oldest is not None else 0.0)
    yield GaugeMetricFamily("inferq_webhook_deliveries_pending", "Webhook deliveries waiting to be sent, now or at "
                            "a retry's time", value=pending)
    yield GaugeMetricFamily("inferq_webhook_deliveries_in_flight", "Webhook delivery attempts under way",
                            value=in_flight)
    family = HistogramMetricFamily("inferq_webhook_delivery_seconds", "Time from a webhook's event (a job's or "
                                   "batch's end) to its delivery, retries included")
    hist = webhook_lag.histogram(r)
    if hist:
        family.add_metric([], hist[0], hist[1])
    yield family
