"""Boot a worker process: load the model, then take jobs until told to stop."""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import redis

from queue_schema.errors import InferqError
from worker import gpu
from worker import runtime as runtime_mod
from worker.rq_worker import InferqWorker
from worker.runtime import ModelSpec, WorkerRuntime

log = logging.getLogger(__name__)
SOCKET_TIMEOUT_S = 10


class WorkerStartError(Exception):
    """The worker cannot start; the message is the one line to show the operator."""


def run_worker(redis_url: str, spec: ModelSpec, burst: bool = False, max_jobs: int | None = None,
               on_loaded=None) -> None:
    """Load ``spec`` and serve its queues. SIGTERM/Ctrl-C: finish the current job, then return."""
    try:
        gpu_index = gpu.pin(spec.device)  # before any CUDA library loads
    except gpu.GPUError as exc:
        raise WorkerStartError(str(exc)) from None
    if gpu_index is not None and spec.options.gpu_layers == 0:
        spec = replace(spec, options=replace(spec.options, gpu_layers=999))  # a GPU worker offloads everything
    # Heartbeats, events and cancels get a short socket timeout, so a dead link shows
    # within seconds. RQ's BLPOP blocks for minutes, and RQ sets the timeout it needs
    # on its own client's pool, but only for connections made after it does: sharing
    # one pool left RQ blocking on the earlier connections' 5 s default, and each
    # time-out sent RQ into a back-off of up to a minute with jobs waiting.
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=SOCKET_TIMEOUT_S,
                                  health_check_interval=30)
    rq_client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=None,
                                     health_check_interval=30)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise WorkerStartError(f"cannot reach Redis at {redis_url}: {exc}") from None
    runtime = WorkerRuntime(client, spec)
    try:
        runtime.load()
    except InferqError as exc:
        runtime.shutdown()
        raise WorkerStartError(exc.message) from None
    runtime_mod.install(runtime)
    if on_loaded:
        on_loaded(runtime)
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    try:
        while True:
            rq_worker = InferqWorker(runtime, connection=rq_client)
            try:
                rq_worker.work(burst=burst, max_jobs=max_jobs, logging_level=level)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # RQ leaves its loop on a Redis error between jobs, then fails to
                # deregister and lets that error out: the model stays loaded and we wait.
                log.warning("worker %s: RQ's loop ended on a Redis error: %s", runtime.id, exc)
            if runtime.unhealthy:
                raise WorkerStartError("the model stopped working after a backend failure; restart the worker")
            if burst or max_jobs or runtime.stop_requested:
                return
            # Nobody asked it to stop, so RQ gave up (on Redis, or on a surprise it logged).
            log.warning("worker %s: RQ's loop ended; waiting for Redis, then registering again", runtime.id)
            if _redis_ok(client):
                time.sleep(1.0)  # not a Redis outage: do not spin on whatever RQ tripped over
            _wait_for_redis(client, runtime)
            # A job cut off by the outage must have its events in the log before
            # the new incarnation makes it the reaper's to close.
            runtime.publisher.flush(10)
            try:
                rq_worker.register_death()  # what its teardown could not do; else rq-dashboard shows it for minutes
            except redis.RedisError:
                pass
            runtime.incarnation += 1
    finally:
        runtime.shutdown()


def _redis_ok(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _wait_for_redis(client: redis.Redis, runtime: WorkerRuntime) -> None:
    delay = 0.2
    while not runtime.stop_requested and not _redis_ok(client):
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    log.info("worker %s: Redis is back", runtime.id)
