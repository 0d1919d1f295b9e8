"""Live workers and the models they serve, kept fresh by worker heartbeats.

A worker writes its record with a short TTL every few seconds; a record that
expires means the worker is gone. Models stay known for a while after their
last worker left (MODEL_TTL_S, the grace), so a restarting worker does not
turn submits into 404s; meanwhile they are ``offline``, not served.
"""
from __future__ import annotations

from dataclasses import dataclass

import redis

from queue_schema import keys
from queue_schema.lifecycle import clock
from queue_schema.records import ModelInfo, WorkerInfo

HEARTBEAT_INTERVAL_S = 2.0
WORKER_TTL_S = 10  # a worker silent this long is considered lost
MODEL_TTL_S = 600  # the grace: a model no worker served for this long is forgotten
SERVING_STATES = ("idle", "busy")  # the states in which a worker takes jobs
# Admission takes jobs for a model while any worker of it is up, loading ones included: they will
# take what is queued for them (a restarting worker must not turn submits into 503s).
QUEUEING_STATES = ("loading", "idle", "busy")


def publish_heartbeat(client: redis.Redis, worker: WorkerInfo, model: ModelInfo) -> None:
    # The fleet's clock: a worker whose own clock runs ahead would otherwise evict its peers below
    # (their scores look stale), and one behind would look dead to admission.
    now = clock.now_s(client)
    worker = worker.model_copy(update={"heartbeat_at": now})
    model = model.model_copy(update={"last_seen": now})
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.worker(worker.id), worker.model_dump_json(), ex=WORKER_TTL_S)
    pipe.zadd(keys.WORKERS, {worker.id: now})
    pipe.set(keys.model(model.name), model.model_dump_json(), ex=MODEL_TTL_S)
    pipe.zadd(keys.MODELS, {model.name: now})
    serving = keys.model_workers(model.name)
    if worker.state in QUEUEING_STATES:
        pipe.zadd(serving, {worker.id: now})
    else:
        pipe.zrem(serving, worker.id)
    pipe.zremrangebyscore(serving, "-inf", now - WORKER_TTL_S)
    pipe.expire(serving, MODEL_TTL_S)
    pipe.execute()


def remove_worker(client: redis.Redis, worker_id: str, model: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.delete(keys.worker(worker_id))
    pipe.zrem(keys.WORKERS, worker_id)
    pipe.zrem(keys.model_workers(model), worker_id)
    pipe.execute()


def live_workers(client: redis.Redis) -> list[WorkerInfo]:
    return [WorkerInfo.model_validate_json(b) for b in live_worker_records(client)]


def live_worker_records(client: redis.Redis) -> list[bytes]:
    """The live workers' records as they wrote them (JSON)."""
    now = clock.now_s(client)
    ids = [i.decode() for i in client.zrangebyscore(keys.WORKERS, now - WORKER_TTL_S, "+inf")]
    client.zremrangebyscore(keys.WORKERS, "-inf", now - 3600)
    if not ids:
        return []
    return [b for b in client.mget([keys.worker(i) for i in ids]) if b]


def known_models(client: redis.Redis) -> list[ModelInfo]:
    """Models some worker served within the grace period, online or not."""
    now = clock.now_s(client)
    names = [n.decode() for n in client.zrangebyscore(keys.MODELS, now - MODEL_TTL_S, "+inf")]
    # Names past the grace would otherwise pile up in the index for ever.
    client.zremrangebyscore(keys.MODELS, "-inf", now - MODEL_TTL_S)
    if not names:
        return []
    blobs = client.mget([keys.model(n) for n in names])
    return [ModelInfo.model_validate_json(b) for b in blobs if b]


@dataclass(frozen=True)
class ModelStatus:
    """A known model and whether anything serves it now.

    ``online``: a live worker of the model takes jobs (idle or busy, the test
    /ready uses). ``offline``: none does now (its workers left, or are still
    loading, or are unhealthy or stopping); a submit would wait in the queue
    for a worker that may never come, so clients should say so.
    """

    model: ModelInfo
    workers: int  # live workers of the model, in any state
    serving: int  # those of them that take jobs

    @property
    def status(self) -> str:
        return "online" if self.serving else "offline"


def model_statuses(client: redis.Redis, workers: list[WorkerInfo] | None = None) -> list[ModelStatus]:
    """Every known model with its status, by name; ``workers`` saves a read when the caller has them."""
    if workers is None:
        workers = live_workers(client)
    out = []
    for m in sorted(known_models(client), key=lambda m: m.name):
        mine = [w for w in workers if w.model == m.name]
        out.append(ModelStatus(m, len(mine), sum(1 for w in mine if w.state in SERVING_STATES)))
    return out
