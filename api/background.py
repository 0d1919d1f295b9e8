"""The work every API process does besides answering requests: webhook deliveries and batches.

Both live on durable schedules in Redis (queue_schema.schedule): whichever
API process claims an item first handles it, a process that dies mid-way
leaves its claim to lapse and another picks the item up, so nothing depends
on one process staying up. ``api/wsgi.py`` starts the loop in each process,
beside the reaper; tests call ``tick`` directly.

Webhooks are POSTed with ``requests``: no redirects followed, short
timeouts, and the host checked against ``INFERQ_WEBHOOK_ALLOW_HOSTS`` again
before each attempt.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import redis
import requests
from flask import Flask

from api.config import ConfigError, csv_setting
from queue_schema import jobs, webhooks
from queue_schema.events import now_ms

log = logging.getLogger(__name__)
TICK_S = 0.25
SENDERS = 8


def init_app(app: Flask) -> None:
    raw = app.config.get("WEBHOOK_SECRET")
    try:
        app.extensions["inferq_webhook_key"] = webhooks.parse_secret(raw) if raw else None
    except webhooks.WebhookConfigError as exc:
        raise ConfigError(str(exc)) from None
    app.extensions["inferq_webhook_hosts"] = frozenset(
        h.lower() for h in csv_setting(app.config.get("WEBHOOK_ALLOW_HOSTS")) or ())


class Background:
    def __init__(self, app: Flask, identity: str):
        self.app, self.id = app, identity
        self._stop = threading.Event()
        self._senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="inferq-webhook")
        self._session = requests.Session()
        self._session.trust_env = False  # never through a proxy from the environment

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
            self.deliver_webhooks()
            from api import batch_runner  # late: it imports the OpenAI routes' request models

            batch_runner.advance_due(self.id)

    # --- webhooks ------------------------------------------------------------------------
    def deliver_webhooks(self) -> int:
        if self.app.extensions["inferq_webhook_key"] is None:
            # It could only abandon them: leave deliveries to the processes that can sign them.
            return 0
        res = self.app.extensions["inferq"]
        deliveries = webhooks.Deliveries(res.redis, float(self.app.config["WEBHOOK_RETRY_BASE_S"]))
        claimed = deliveries.claim(now_ms())
        if not claimed:
            return 0
        list(self._senders.map(lambda item: self._deliver_one(deliveries, *item), claimed))
        return len(claimed)

    def _deliver_one(self, deliveries: webhooks.Deliveries, claim, delivery: webhooks.Delivery) -> None:
        try:
            self._deliver(deliveries, claim, delivery)
        except Exception as exc:  # Redis gone mid-way, or a bug: the claim lapses and it is tried again
            log.warning("webhook %s for %s: %s", delivery.id, delivery.target, exc)

    def _deliver(self, deliveries: webhooks.Deliveries, claim, delivery: webhooks.Delivery) -> None:
        key = self.app.extensions["inferq_webhook_key"]
        hosts = self.app.extensions["inferq_webhook_hosts"]
        problem = webhooks.url_problem(delivery.url, hosts)
        if key is None or problem is not None:
            why = "INFERQ_WEBHOOK_SECRET is unset" if key is None else f"webhook_url {problem}"
            deliveries.failed(claim, delivery, why, now_ms(), retry=False)
            log.warning("webhook %s for %s abandoned: %s", delivery.id, delivery.target, why)
            return
        body = delivery.body or deliveries.keep_body(delivery, self._body(delivery))
        try:
            resp = self._session.post(delivery.url, data=body, headers=webhooks.headers(key, delivery.msg_id, body),
                                      timeout=(2.0, float(self.app.config["WEBHOOK_TIMEOUT_S"])),
                                      allow_redirects=False)
            status, ok = resp.status_code, 200 <= resp.status_code < 300
            resp.close()
            reason = f"HTTP {status}"
        except requests.RequestException as exc:
            status, ok, reason = 0, False, exc.__class__.__name__
        if ok:
            deliveries.delivered(claim, delivery, status, now_ms())
            log.info("webhook %s for %s delivered (attempt %d)", delivery.id, delivery.target,
                     delivery.attempts + 1)
        else:
            what = deliveries.failed(claim, delivery, reason, now_ms())
            log.info("webhook %s for %s: %s; %s", delivery.id, delivery.target, reason, what)

    def _body(self, delivery: webhooks.Delivery) -> dict:
        res = self.app.extensions["inferq"]
        if delivery.type.startswith("batch."):
            from queue_schema import batches

            found = batches.get(res.redis, delivery.target)
            data = found.to_dict() if found is not None else {"id": delivery.target, "object": "batch",
                                                             "status": delivery.state}
        else:
            view = jobs.view(res.redis, res.eventlog, delivery.target)
            data = {"id": delivery.target, "object": "job", **(view.to_dict() if view else {}),
                    "state": delivery.state}
        stamp = datetime.fromtimestamp(delivery.created_ms / 1000, timezone.utc).isoformat().replace("+00:00", "Z")
        return {"type": delivery.type, "timestamp": stamp, "data": data}
