"""Shared clients, kept in ``app.extensions['inferq']``: one Redis pool per process."""
from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import Flask, current_app

from queue_schema.eventlog import EventLog


@dataclass
class Resources:
    redis: redis.Redis
    eventlog: EventLog


def init_app(app: Flask) -> None:
    client = redis.Redis.from_url(app.config["REDIS_URL"], socket_connect_timeout=2, socket_timeout=10,
                                  health_check_interval=30, retry_on_timeout=False,
                                  max_connections=int(app.config["REDIS_MAX_CONNECTIONS"]))
    app.extensions["inferq"] = Resources(client, EventLog(client, ttl_s=int(app.config["EVENT_TTL_S"])))


def resources() -> Resources:
    return current_app.extensions["inferq"]
