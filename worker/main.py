"""Boot a worker process: load the model, then take jobs until told to stop."""
from __future__ import annotations

import logging

import redis

from queue_schema.errors import InferqError
from worker import runtime as runtime_mod
from worker.rq_worker import InferqWorker
from worker.runtime import ModelSpec, WorkerRuntime

log = logging.getLogger(__name__)


class WorkerStartError(Exception):
    """The worker cannot start; the message is the one line to show the operator."""


def run_worker(redis_url: str, spec: ModelSpec, burst: bool = False, max_jobs: int | None = None) -> None:
    """Load ``spec`` and serve its queues. SIGTERM/Ctrl-C: finish the current job, then return."""
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
    try:
        InferqWorker(runtime).work(burst=burst, max_jobs=max_jobs, logging_level=logging.getLevelName(
            logging.getLogger().getEffectiveLevel()))
    finally:
        runtime.shutdown()
