"""Boot a worker process: load the model, then take and decode jobs until told to stop.

SIGTERM or Ctrl-C: take no more jobs, finish the running ones, exit 0. A
second one: end the running jobs now (each given back to its queue if it
streamed nothing, else ended with ``WORKER_LOST``), exit 0.
"""
from __future__ import annotations

import logging
import signal
from dataclasses import replace

import redis

from queue_schema.errors import ConfigError, InferqError, StartError
from queue_schema.lifecycle import connection
from queue_schema.lifecycle import events_url as events_url_setting
from queue_schema.lifecycle.connection import masked
from queue_schema.settings import Settings
from worker import gpu
from worker.intake import Intake
from worker.runtime import ModelSpec, WorkerRuntime

log = logging.getLogger(__name__)
SOCKET_TIMEOUT_S = 10


class WorkerStartError(StartError):
    """The worker cannot start; the message is the one line to show the operator."""


def run_worker(redis_url: str, spec: ModelSpec, burst: bool = False, on_loaded=None,
               settings: Settings | None = None) -> None:
    """Load ``spec`` and serve its queues until SIGTERM/Ctrl-C (or, with ``burst``, empty queues)."""
    try:
        gpu_index = gpu.pin(spec.device)  # before any CUDA library loads
    except gpu.GPUError as exc:
        raise WorkerStartError(str(exc)) from None
    if gpu_index is not None and spec.options.gpu_layers == 0:
        spec = replace(spec, options=replace(spec.options, gpu_layers=999))  # a GPU worker offloads everything
    # Commands get a short socket timeout, so a dead link shows within seconds; the
    # connections that block (the wake list's BLPOP, the cancel channel) get their own.
    # With a Sentinel URL both follow the master through a failover (queue_schema.lifecycle.connection).
    try:
        client = connection.client(redis_url, socket_connect_timeout=2, socket_timeout=SOCKET_TIMEOUT_S,
                                   health_check_interval=30)
        blocking = connection.client(redis_url, socket_connect_timeout=2, socket_timeout=None,
                                     socket_keepalive=True, health_check_interval=30)
    except (ValueError, ConfigError) as exc:  # an unknown scheme, a Sentinel URL without a service...
        raise WorkerStartError(f"bad Redis URL: {exc}") from None
    try:
        client.ping()
    except redis.RedisError as exc:
        raise WorkerStartError(f"cannot reach Redis at {masked(redis_url)}: {exc}") from None
    events_url = events_url_setting.from_env()
    events = None
    if events_url:
        try:
            events = connection.events_client(events_url, socket_connect_timeout=2, socket_timeout=SOCKET_TIMEOUT_S)
            events.ping()
        except (ValueError, ConfigError) as exc:
            raise WorkerStartError(f"bad INFERQ_EVENTS_URL: {exc}") from None
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise WorkerStartError(f"cannot reach the events store at {masked(events_url)}: {exc}") from None
    runtime = WorkerRuntime(client, spec, listen_client=blocking, settings=settings or Settings.from_env(),
                            events=events, events_url=events_url)
    try:
        runtime.load()
    except InferqError as exc:
        runtime.shutdown()
        raise WorkerStartError(f"{exc.code.value}: {exc.message}") from None
    if on_loaded:
        on_loaded(runtime)

    def on_signal(signum, frame):
        if runtime.stop_admitting:
            runtime.abort()
        else:
            runtime.request_stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        Intake(runtime, blocking, burst=burst).start()
        runtime.serve()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        runtime.shutdown()
    if runtime.unhealthy:
        raise WorkerStartError("the model stopped working after a backend failure; restart the worker")
