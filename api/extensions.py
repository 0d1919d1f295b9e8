"""Shared clients, kept in ``app.extensions['inferq']``: one Redis pool per process."""
from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import Flask, current_app

from api import config, sse
from api.fanout import ChannelHub, ShardedHubs
from api.memory import MemoryGuard
from queue_schema.errors import ConfigError
from queue_schema.lifecycle import clock, connection
from queue_schema.lifecycle.admission import Admission
from queue_schema.lifecycle.ending import Ending
from queue_schema.lifecycle.eventlog import EventLog
from queue_schema.settings import Settings


@dataclass
class Resources:
    redis: redis.Redis
    eventlog: EventLog
    channels: ChannelHub | ShardedHubs  # the process's pub/sub connection for every job stream (one per shard)
    narration: ChannelHub  # the queue's Redis's, for the operators' feed (the same hub unless INFERQ_EVENTS_URL)
    admission: Admission
    settings: Settings  # what the API shares with the workers (TTL, Retry-After values), read once
    ending: Ending  # the one way a job ends (a cancel of a queued job, here)


def init_app(app: Flask) -> None:
    # A bounded pool that makes a request wait for a free connection: under gevent
    # a burst of 1,000 stream connects would otherwise open 1,000 connections (and
    # redis-py reads its package metadata for each new one). No API route blocks on
    # Redis for long (streams share the hub's pub/sub connection), so waits are short.
    # With a Sentinel URL the pool also follows the master through a failover.
    try:
        client = connection.blocking_client(
            app.config["REDIS_URL"], max_connections=int(app.config["REDIS_MAX_CONNECTIONS"]),
            timeout=float(app.config["REDIS_POOL_TIMEOUT_S"]), socket_connect_timeout=2, socket_timeout=10,
            health_check_interval=30, retry_on_timeout=False)
    except (ValueError, ConfigError) as exc:  # redis-py's (an unknown scheme) and ours (a Sentinel URL...)
        raise ConfigError(f"REDIS_URL: {exc}") from None
    events_url = app.config.get("EVENTS_URL") or None
    events = client
    if events_url:
        try:
            if connection.is_cluster(events_url):
                events = connection.events_client(events_url, max_connections=int(app.config["REDIS_MAX_CONNECTIONS"]),
                                                  socket_connect_timeout=2, socket_timeout=10)
            else:
                events = connection.blocking_client(
                    events_url, max_connections=int(app.config["REDIS_MAX_CONNECTIONS"]),
                    timeout=float(app.config["REDIS_POOL_TIMEOUT_S"]), socket_connect_timeout=2, socket_timeout=10)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"INFERQ_EVENTS_URL: {exc}") from None
    settings = config.settings(app)
    eventlog = EventLog(events, ttl_s=settings.job_ttl_s, queue=client)
    narration = ChannelHub(client, decode=sse.relayed)
    if eventlog.clustered:
        channels = ShardedHubs(events, decode=sse.relayed)
    else:
        channels = ChannelHub(events, decode=sse.relayed) if eventlog.apart else narration
    app.extensions["inferq"] = Resources(client, eventlog, channels, narration, Admission(client, settings, eventlog),
                                         settings, Ending(client, eventlog))
    app.extensions["inferq_events_url"] = events_url
    app.extensions["inferq_memory"] = MemoryGuard(client, float(app.config["REDIS_HEADROOM"]),
                                                  settings.retry_after.busy_s)


def resources() -> Resources:
    return current_app.extensions["inferq"]


def now_ms() -> int:
    """The fleet's time (queue_schema.lifecycle.clock): every stored time another process compares is in it."""
    return clock.now_ms(resources().redis)
