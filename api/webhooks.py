"""Webhooks: a signed POST when a job (or a batch) ends, delivered at least once from a durable schedule.

A delivery is scheduled in the step that ends its job: the event log's
terminal append writes ``keys.webhook("job_<id>")`` and makes it due
(queue_schema.lifecycle.eventlog), so no path that ends a job can miss it, and a job
ends once, so it is scheduled once. Batches schedule theirs in the step that
moves them to a final state (api.batch_store).

Any process runs the delivery loop (``api/background.py`` in every API
process): it claims due deliveries from the schedule (queue_schema.lifecycle.schedule,
so two processes never send one at the same time), builds the body once
(kept in the delivery, so a retry sends the same bytes), signs it as
Standard Webhooks specifies (``webhook-id``, ``webhook-timestamp``,
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``) and
posts it. A 2xx ends it; anything else (a redirect too: none is followed) is
retried with exponential backoff for up to ``GIVE_UP_S`` after the event.

SSRF: a ``webhook_url`` must be http(s) to a host in
``INFERQ_WEBHOOK_ALLOW_HOSTS`` (422 at submit otherwise, and checked again
before each send, should the list have shrunk), with no user info.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis

from api import webhook_lag
from queue_schema import keys
from queue_schema.errors import ConfigError
from queue_schema.lifecycle.ending import WEBHOOK_RECORD_TTL_S
from queue_schema.lifecycle.schedule import Claim, Schedule

SECRET_PREFIX = "whsec_"
GIVE_UP_S = 24 * 3600
BACKOFF_BASE_S = 5.0
BACKOFF_MAX_S = 3600.0
DELIVERED_TTL_S = 24 * 3600  # a delivery's record stays this long after it ended, for operators
# Every record expires, sent or not (queue_schema.lifecycle.eventlog writes them with this TTL).
RECORD_TTL_S = WEBHOOK_RECORD_TTL_S
CLAIM_MS = 60_000
MAX_URL = 2048


class WebhookConfigError(ConfigError):
    pass


def parse_secret(raw: str) -> bytes:
    """The key of a ``whsec_<base64>`` secret (Standard Webhooks' format)."""
    if not raw.startswith(SECRET_PREFIX):
        raise WebhookConfigError("INFERQ_WEBHOOK_SECRET must be 'whsec_' followed by a base64 key")
    try:
        key = base64.b64decode(raw[len(SECRET_PREFIX):], validate=True)
    except ValueError:
        raise WebhookConfigError("INFERQ_WEBHOOK_SECRET: the part after 'whsec_' is not base64") from None
    if len(key) < 16:
        raise WebhookConfigError("INFERQ_WEBHOOK_SECRET: the key is shorter than 16 bytes")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(key: bytes, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(key, msg_id, ts, body),
            "Content-Type": "application/json"}


def url_problem(url: str, allow_hosts: frozenset[str]) -> str | None:
    """Why ``url`` may not be called (None: it may). Hosts match by name, or name:port if given so."""
    if len(url) > MAX_URL:
        return f"is longer than {MAX_URL} characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http or https URL"
    if parts.username is not None or parts.password is not None:
        return "must not hold credentials"
    host = parts.hostname.lower()
    if host not in allow_hosts and (port is None or f"{host}:{port}" not in allow_hosts):
        return f"names host {host!r}, which is not in INFERQ_WEBHOOK_ALLOW_HOSTS"
    return None


def schedule_batch_event(pipe, batch_id: str, url: str, event_type: str, tenant: str, now_ms: int) -> None:
    """Schedule a batch's webhook (in the caller's transaction: the step that ends the batch)."""
    delivery = f"batch_{batch_id}"
    pipe.hset(keys.webhook(delivery), mapping={"url": url, "type": event_type, "target": batch_id,
                                               "state": event_type.partition(".")[2], "tenant": tenant,
                                               "created": now_ms})
    pipe.expire(keys.webhook(delivery), RECORD_TTL_S)
    pipe.zadd(keys.WEBHOOKS_DUE, {delivery: now_ms})


@dataclass
class Delivery:
    id: str  # also the webhook-id, the same on every attempt
    url: str
    type: str  # job.finished | job.failed | job.cancelled | batch.completed ...
    target: str  # the job or batch id
    state: str
    tenant: str
    created_ms: int
    attempts: int
    body: bytes | None  # built on the first attempt, then sent as is

    @property
    def msg_id(self) -> str:
        return "msg_" + self.id


class Deliveries:
    def __init__(self, client: redis.Redis, backoff_base_s: float = BACKOFF_BASE_S):
        self.redis = client
        self.schedule = Schedule(client, keys.WEBHOOKS_DUE, keys.WEBHOOKS_CLAIMED, CLAIM_MS)
        self.backoff_base_s = backoff_base_s

    def claim(self, now_ms: int, count: int = 20) -> list[tuple[Claim, Delivery]]:
        out = []
        claims = self.schedule.claim(now_ms, count)
        if not claims:  # every tick of every API process asks: nothing more to write then
            return out
        lag = self.redis.pipeline(transaction=False)
        for claim in claims:
            raw = self.redis.hgetall(keys.webhook(claim.member))
            if not raw or b"url" not in raw:  # its record expired: nothing to send
                self.schedule.finish(claim)
                webhook_lag.ended(lag, claim.member)
                continue
            f = {k.decode(): v for k, v in raw.items()}
            delivery = Delivery(claim.member, f["url"].decode(), f["type"].decode(), f["target"].decode(),
                                f.get("state", b"").decode(), f.get("tenant", b"").decode(),
                                int(f.get("created", b"0")), int(f.get("attempts", b"0")), f.get("body"))
            # Off the due set while it is tried and after a failure: its age is kept from here on.
            webhook_lag.claimed(lag, delivery.id, delivery.created_ms or now_ms)
            out.append((claim, delivery))
        webhook_lag.forget_before(lag, now_ms - RECORD_TTL_S * 1000)
        lag.execute()
        return out

    def keep_body(self, delivery: Delivery, body: dict) -> bytes:
        """The body every attempt sends: the first one built wins."""
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        self.redis.hsetnx(keys.webhook(delivery.id), "body", data)
        return self.redis.hget(keys.webhook(delivery.id), "body")

    def delivered(self, claim: Claim, delivery: Delivery, status: int, now_ms: int) -> None:
        key = keys.webhook(delivery.id)
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={"result": "delivered", "attempts": delivery.attempts + 1, "last_status": status,
                                "last_ms": now_ms})
        pipe.expire(key, DELIVERED_TTL_S)
        webhook_lag.delivered(pipe, delivery.id, delivery.created_ms, now_ms)
        pipe.execute()
        self.schedule.finish(claim)

    def failed(self, claim: Claim, delivery: Delivery, reason: str, now_ms: int, retry: bool = True) -> str:
        """Record a failed attempt; retried later unless past the give-up time. Returns what happens next."""
        attempts = delivery.attempts + 1
        key = keys.webhook(delivery.id)
        give_up = not retry or now_ms - delivery.created_ms >= GIVE_UP_S * 1000
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={"attempts": attempts, "last_error": reason[:300], "last_ms": now_ms,
                                **({"result": "abandoned"} if give_up else {})})
        if give_up:
            pipe.expire(key, DELIVERED_TTL_S)
            webhook_lag.ended(pipe, delivery.id)
        pipe.execute()
        if give_up:
            self.schedule.finish(claim)
            return "abandoned"
        wait = min(BACKOFF_MAX_S, self.backoff_base_s * 2 ** (attempts - 1))  # 5 s, 10 s, 20 s...
        self.schedule.reschedule(claim, now_ms + int(wait * 1000))
        return f"retry in {wait:.1f} s"

    def record(self, delivery_id: str) -> dict[str, str]:
        """A delivery's record as strings (for operators and tests)."""
        raw = self.redis.hgetall(keys.webhook(delivery_id))
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
