"""A job's state, read back from its event log (the truth) and RQ's books.

Admission (``queue_schema.lifecycle.admission``) makes jobs; this module answers what
they are doing now: queued (at which position, with an ETA), running, ended.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from queue_schema import keys, records
from queue_schema.events import End, _Event
from queue_schema.lifecycle import clock, registry, stats
from queue_schema.lifecycle.eventlog import LAST_LOOK, EventLog, final_state, last_logged


def queue(client: redis.Redis, model: str, priority: str) -> Queue:
    return Queue(keys.queue_name(model, priority), connection=client, serializer=JSONSerializer)


def model_queues(client: redis.Redis, model: str) -> list[Queue]:
    """The model's queues in the order a worker drains them."""
    return [queue(client, model, p) for p in keys.PRIORITIES]


def started_registry(client: redis.Redis, queue_name: str) -> StartedJobRegistry:
    return StartedJobRegistry(queue_name, connection=client, serializer=JSONSerializer)


def cancelled_end(job_id: str, seq: int) -> End:
    """The terminal event of a job cancelled before it produced anything."""
    return End(job_id=job_id, seq=seq, tokens_out=0, decode_time_ms=0, stop_reason="cancelled", text="")


@dataclass
class QueueSnapshot:
    """What a submit needs to know, read in two round trips."""

    model: records.ModelInfo | None
    lengths: dict[str, int]  # priority -> waiting jobs (every tenant's)
    job_seconds: float | None
    serving_workers: int
    slots: int = 1  # jobs each serving worker runs at once
    queues: dict[str, dict[str, int]] = field(default_factory=dict)  # priority -> queue name -> waiting

    @property
    def depth(self) -> int:
        return sum(self.lengths.values())

    def eta(self, position: int) -> float | None:
        """Wait before a job at ``position`` starts: jobs ahead x recent job time / slots serving."""
        if self.job_seconds is None or not self.serving_workers:
            return None
        return round((position + 1) * self.job_seconds / (self.serving_workers * max(1, self.slots)), 3)


def snapshot(client: redis.Redis, model: str) -> QueueSnapshot:
    now = clock.now_s(client)
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.model(model))
    for p in keys.PRIORITIES:
        pipe.lrange(keys.queue_ring(keys.queue_name(model, p)), 0, -1)
    pipe.hget(keys.histogram(stats.RATE_KEY, model), "value")
    pipe.zcount(keys.model_workers(model), now - registry.WORKER_TTL_S, "+inf")
    blob, *rest = pipe.execute()
    rings, (per_job, serving) = rest[:-2], rest[-2:]
    # The model's own queue counts whether or not it is in the ring (jobs RQ's API pushed).
    names = {p: {keys.queue_name(model, p)} | {m.decode() for m in ring} for p, ring in zip(keys.PRIORITIES, rings)}
    pipe = client.pipeline(transaction=False)
    for p in keys.PRIORITIES:
        for name in sorted(names[p]):
            pipe.llen(keys.rq_queue(name))
    counts = iter(pipe.execute())
    queues = {p: {name: next(counts) for name in sorted(names[p])} for p in keys.PRIORITIES}
    lengths = {p: sum(queues[p].values()) for p in keys.PRIORITIES}
    model_info = records.ModelInfo.model_validate_json(blob) if blob else None
    return QueueSnapshot(model_info, lengths, float(per_job) if per_job is not None else None, int(serving),
                         model_info.slots if model_info else 1, queues)


def depth(client: redis.Redis, model: str) -> int:
    return snapshot(client, model).depth


@dataclass
class JobView:
    """What a client sees of a job: state, position, result, timings."""

    job_id: str
    state: str  # queued | expired | running | finished | failed | cancelled
    model: str | None
    position: int | None
    terminal: _Event | None
    submitted_ms: int | None
    started_ms: int | None

    eta_s: float | None = None
    metadata: dict | None = None  # the submitter's, echoed with the result

    def to_dict(self) -> dict:
        out: dict = {"job_id": self.job_id, "state": self.state, "model": self.model,
                     "position": self.position, "eta_s": self.eta_s, "submitted_ms": self.submitted_ms,
                     "started_ms": self.started_ms}
        t = self.terminal
        if t is not None and t.type == "end":
            out["result"] = {"text": t.text, "tokens_out": t.tokens_out, "stop_reason": t.stop_reason,
                             "decode_time_ms": t.decode_time_ms, "metadata": self.metadata or {}}
            out["finished_ms"] = t.ts
        elif t is not None:
            out["error"] = {"code": t.code, "message": t.message, "retriable": t.retriable}
            out["finished_ms"] = t.ts
        return out


def view(client: redis.Redis, log: EventLog, job_id: str) -> JobView | None:
    """The job's state, from its event log first (the truth) and RQ second."""
    try:
        job = Job.fetch(job_id, connection=client, serializer=JSONSerializer)
    except Exception:  # rq raises NoSuchJobError, or a decode error for foreign keys
        job = None
    return _view(client, job_id, job, log.last(job_id), with_position=True)


def views(client: redis.Redis, job_ids: list[str], events: redis.Redis | None = None) -> list[JobView | None]:
    """Many jobs' states in one round trip (one per store, where the logs have their own: ``events``), without
    queue positions (listings)."""
    events = client if events is None else events
    pipe = client.pipeline(transaction=False)
    log_pipe = pipe if events is client else events.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hgetall(keys.rq_job(job_id))
        log_pipe.xrevrange(keys.job_events(job_id), count=LAST_LOOK)
    if log_pipe is pipe:
        raw = pipe.execute()
        books, tails = raw[::2], raw[1::2]
    else:
        books, tails = pipe.execute(), log_pipe.execute()
    out = []
    for i, job_id in enumerate(job_ids):
        fields, entries = books[i], tails[i]
        job = None
        if fields:
            try:
                job = Job(job_id, connection=client, serializer=JSONSerializer)
                job.restore(fields)
            except Exception:  # a hash that is not an RQ job's
                job = None
        last = last_logged(entries)
        out.append(_view(client, job_id, job, last, with_position=False))
    return out


def _view(client: redis.Redis, job_id: str, job: Job | None, last: _Event | None,
          with_position: bool) -> JobView | None:
    if job is None and last is None:
        return None
    meta = job.meta if job is not None else {}
    started_ms = int(job.started_at.timestamp() * 1000) if job is not None and job.started_at else None
    terminal = last if last is not None and last.terminal else None
    position = snap = None
    if terminal is not None:
        state = final_state(terminal)
    else:
        status = job.get_status(refresh=False) if job is not None else None
        if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            state = "queued"
            if with_position and meta.get("model"):
                snap = snapshot(client, meta["model"])
                position = _position(client, job, snap)
            expires = meta.get("expires_ms")
            if expires and clock.now_ms(client) > expires:
                state = "expired"  # the worker that takes it will end it with TIMEOUT
        elif status == JobStatus.CANCELED:
            state = "cancelled"
        elif status in (JobStatus.FAILED, JobStatus.STOPPED):
            state = "failed"
        else:
            state = "running"
    eta = snap.eta(position) if position is not None and snap is not None else None
    return JobView(job_id, state, meta.get("model"), position, terminal, meta.get("submitted_ms"), started_ms, eta,
                   _metadata(job) if terminal is not None else None)


def _metadata(job: Job | None) -> dict | None:
    try:
        return (job.kwargs.get("payload") or {}).get("metadata") if job is not None else None
    except Exception:  # a job hash that is not an inferq job's
        return None


def _position(client: redis.Redis, job: Job, snap: QueueSnapshot | None) -> int | None:
    """Jobs that go before this one: an estimate under fair share (every job of a higher priority,
    those ahead in its own queue, and as many of each other tenant's as the ring takes meanwhile)."""
    priority = job.meta.get("priority")
    if snap is None or priority not in keys.PRIORITIES:
        return None
    own = client.lpos(keys.rq_queue(job.origin), job.id)
    if own is None:
        return None
    higher = keys.PRIORITIES[: keys.PRIORITIES.index(priority)]
    others = sum(min(n, own + 1) for name, n in snap.queues.get(priority, {}).items() if name != job.origin)
    return own + others + sum(snap.lengths[p] for p in higher)
