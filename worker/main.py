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
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, health_check_interval=30)
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
    incarnation = 0
    try:
        while True:
            InferqWorker(runtime, incarnation).work(burst=burst, max_jobs=max_jobs, logging_level=level)
            if runtime.unhealthy:
                raise WorkerStartError("the model stopped working after a backend failure; restart the worker")
            if burst or max_jobs or runtime.stop_requested or _redis_ok(client):
                return
            # RQ's loop gives up when Redis goes away; the model stays loaded and we wait.
            log.warning("worker %s: lost Redis; waiting for it to come back", runtime.id)
            _wait_for_redis(client, runtime)
            incarnation += 1
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
