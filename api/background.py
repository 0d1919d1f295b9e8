"""The work every API process does besides answering requests: webhook deliveries and batches.

Both live on durable schedules in Redis (queue_schema.lifecycle.schedule): whichever
API process claims an item first handles it, a process that dies mid-way
leaves its claim to lapse and another picks the item up, so nothing depends
on one process staying up. ``api/wsgi.py`` starts the loop in each process,
beside the reaper; tests call ``tick`` directly.

A tick never waits on a delivery: attempts run on a pool of sender threads
(``api/webhook_sender.py``: a total deadline each, the address checked as it
is connected), and the tick claims only as many deliveries as there are idle
senders, so a slow receiver never delays batches, and never makes a claim
lapse into a duplicate.

Signing keys: ``INFERQ_WEBHOOK_SECRETS`` (``tenant:whsec_...`` entries) gives
a tenant its own key, so no tenant can forge deliveries to another's
receiver; ``INFERQ_WEBHOOK_SECRET`` signs for every other tenant. A process
without the key a delivery needs gives it back for a process that has it.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import redis
from flask import Flask

from api import webhook_sender, webhooks
from api.config import csv_setting
from queue_schema.errors import ConfigError
from queue_schema.lifecycle import clock, connection, events_url
from queue_schema.lifecycle import views as jobs

log = logging.getLogger(__name__)
TICK_S = 0.25
SENDERS = 8
EVENTS_STORE_RENEW_MS = 5_000  # well inside events_url.USER_TTL_MS
NO_KEY_RETRY_MS = 10_000  # a delivery this process cannot sign: back to the schedule, for one that can


def init_app(app: Flask) -> None:
    raw = app.config.get("WEBHOOK_SECRET")
    try:
        app.extensions["inferq_webhook_key"] = webhooks.parse_secret(raw) if raw else None
        app.extensions["inferq_webhook_keys"] = _tenant_keys(app.config.get("WEBHOOK_SECRETS"))
    except webhooks.WebhookConfigError as exc:
        raise ConfigError(str(exc)) from None
    app.extensions["inferq_webhook_hosts"] = frozenset(
        h.lower() for h in csv_setting(app.config.get("WEBHOOK_ALLOW_HOSTS")) or ())


def _tenant_keys(raw) -> dict[str, bytes]:
    out = {}
    for entry in csv_setting(raw) or ():
        tenant, sep, secret = entry.partition(":")
        if not sep or not tenant.strip():
            raise webhooks.WebhookConfigError("INFERQ_WEBHOOK_SECRETS: entries are tenant:whsec_<base64>")
        out[tenant.strip()] = webhooks.parse_secret(secret.strip())
    return out


def signing_key(app: Flask, tenant: str) -> bytes | None:
    """The key a delivery of ``tenant`` is signed with here: its own, else the global one (None: neither)."""
    return app.extensions["inferq_webhook_keys"].get(tenant) or app.extensions["inferq_webhook_key"]


def can_sign(app: Flask) -> bool:
    return app.extensions["inferq_webhook_key"] is not None or bool(app.extensions["inferq_webhook_keys"])


class Background:
    def __init__(self, app: Flask, identity: str):
        self.app, self.id = app, identity
        self._stop = threading.Event()
        self._senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="inferq-webhook")
        self._in_flight = 0
        self._lock = threading.Lock()
        self._said_store_ms = 0

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="inferq-background", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except redis.RedisError as exc:
                log.warning("background %s: Redis unavailable (%s)", self.id, exc)
            except Exception:  # never let a surprise stop deliveries and batches
                log.exception("background %s: tick failed", self.id)

    def tick(self) -> None:
        with self.app.app_context():
            self._say_events_store()
            self.deliver_webhooks()
            from api import batch_runner  # late: it imports the OpenAI routes' request models

            batch_runner.advance_due(self.id)

    def _say_events_store(self) -> None:
        """Renew this process's use of its events store (queue_schema.lifecycle.events_url), every few seconds."""
        now = clock.now_ms(self.app.extensions["inferq"].redis)
        if now - self._said_store_ms < EVENTS_STORE_RENEW_MS:
            return
        self._said_store_ms = now
        try:
            events_url.renew(self.app.extensions["inferq"].redis,
                             connection.store_identity(self.app.extensions["inferq_events_url"]), self.id, now)
        except events_url.EventsStoreMismatch as exc:
            # The fleet moved its logs while this process went unseen: it must not serve streams from the old
            # store. Its gunicorn worker stops; the one started in its place is refused at boot, loudly.
            log.error("background %s: %s; stopping this API process", self.id, exc)
            os.kill(os.getpid(), signal.SIGTERM)

    def idle(self) -> bool:
        """No delivery attempt in flight (tests wait for this)."""
        with self._lock:
            return self._in_flight == 0

    # --- webhooks ------------------------------------------------------------------------
    def deliver_webhooks(self) -> int:
        """Claim as many due deliveries as there are idle senders and hand them over; never waits for one."""
        if not can_sign(self.app):
            # It could only give them back: leave deliveries to the processes that can sign them.
            return 0
        with self._lock:
            free = SENDERS - self._in_flight
        if free <= 0:
            return 0
        res = self.app.extensions["inferq"]
        deliveries = webhooks.Deliveries(res.redis, float(self.app.config["WEBHOOK_RETRY_BASE_S"]))
        claimed = deliveries.claim(clock.now_ms(deliveries.redis), free)
        for claim, delivery in claimed:
            with self._lock:
                self._in_flight += 1
            self._senders.submit(self._deliver_one, deliveries, claim, delivery)
        return len(claimed)

    def _deliver_one(self, deliveries: webhooks.Deliveries, claim, delivery: webhooks.Delivery) -> None:
        try:
            self._deliver(deliveries, claim, delivery)
        except Exception as exc:  # Redis gone mid-way, or a bug: the claim lapses and it is tried again
            log.warning("webhook %s for %s: %s", delivery.id, delivery.target, exc)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _deliver(self, deliveries: webhooks.Deliveries, claim, delivery: webhooks.Delivery) -> None:
        now = clock.now_ms(deliveries.redis)
        key = signing_key(self.app, delivery.tenant)
        if key is None:  # another process may hold this tenant's key
            deliveries.schedule.reschedule(claim, now + NO_KEY_RETRY_MS)
            return
        hosts = self.app.extensions["inferq_webhook_hosts"]
        problem = webhooks.url_problem(delivery.url, hosts)
        if problem is not None:
            deliveries.failed(claim, delivery, f"webhook_url {problem}", now, retry=False)
            log.warning("webhook %s for %s abandoned: webhook_url %s", delivery.id, delivery.target, problem)
            return
        body = delivery.body or deliveries.keep_body(delivery, self._body(delivery))
        try:
            status = webhook_sender.post(delivery.url, body, webhooks.headers(key, delivery.msg_id, body),
                                         float(self.app.config["WEBHOOK_TIMEOUT_S"]), hosts)
            ok, reason = 200 <= status < 300, f"HTTP {status}"
        except webhook_sender.SendError as exc:
            status, ok, reason = 0, False, str(exc)
        now = clock.now_ms(deliveries.redis)
        if ok:
            deliveries.delivered(claim, delivery, status, now)
            log.info("webhook %s for %s delivered (attempt %d)", delivery.id, delivery.target,
                     delivery.attempts + 1)
        else:
            what = deliveries.failed(claim, delivery, reason, now)
            log.info("webhook %s for %s: %s; %s", delivery.id, delivery.target, reason, what)

    def _body(self, delivery: webhooks.Delivery) -> dict:
        res = self.app.extensions["inferq"]
        if delivery.type.startswith("batch."):
            from api import batch_store as batches

            found = batches.get(res.redis, delivery.target)
            data = found.to_dict() if found is not None else {"id": delivery.target, "object": "batch",
                                                             "status": delivery.state}
        else:
            view = jobs.view(res.redis, res.eventlog, delivery.target)
            data = {"id": delivery.target, "object": "job", **(view.to_dict() if view else {}),
                    "state": delivery.state}
        stamp = datetime.fromtimestamp(delivery.created_ms / 1000, timezone.utc).isoformat().replace("+00:00", "Z")
        return {"type": delivery.type, "timestamp": stamp, "data": data}
