"""Jobs whose worker died: re-queue them once, or fail them with WORKER_LOST.

RQ notices an abandoned job only when its execution's TTL runs out (the job
timeout plus a minute). inferq knows sooner: a worker that stops
heartbeating for ``registry.WORKER_TTL_S`` is gone. Every live worker checks
its model's started jobs on each heartbeat tick; one of them claims each lost
job (SET NX), so it is handled exactly once.
"""
from __future__ import annotations

import logging

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from queue_schema import jobs, keys, registry, stats
from queue_schema.eventlog import EventLog
from queue_schema.events import Error, Narration, Queued

log = logging.getLogger(__name__)
MAX_REQUEUES = 1
CLAIM_TTL_S = 24 * 3600


def rq_name(worker_id: str, incarnation: int) -> str:
    """The name a worker registers with RQ; a new incarnation after each Redis outage."""
    return f"{worker_id}~{incarnation}"


def split_rq_name(rq_worker_name: str) -> tuple[str, int]:
    """The inferq worker id and incarnation in an RQ worker name (see ``rq_name``)."""
    worker_id, _, incarnation = rq_worker_name.partition("~")
    return worker_id, int(incarnation) if incarnation.isdigit() else 0


def inferq_worker_id(rq_worker_name: str) -> str:
    return split_rq_name(rq_worker_name)[0]


def _owner_running(owner: str, live: dict[str, registry.WorkerInfo]) -> bool:
    # A worker that lost Redis mid-job comes back as a new incarnation; the job
    # its old one had started ran to its end (or failed) while Redis was away.
    worker_id, incarnation = split_rq_name(owner)
    return worker_id in live and incarnation >= live[worker_id].incarnation


def reap(client: redis.Redis, eventlog: EventLog, model: str, reaper_id: str) -> list[tuple[str, str]]:
    """Handle the model's jobs lost with their workers; returns (job_id, action) pairs."""
    live = {w.id: w for w in registry.live_workers(client)}
    done = []
    for queue in jobs.model_queues(client, model):
        started = StartedJobRegistry(queue=queue)
        for job_id in started.get_job_ids(cleanup=False):
            try:
                job = Job.fetch(job_id, connection=client, serializer=JSONSerializer)
            except NoSuchJobError:
                continue
            owner = job.worker_name or ""
            if job.get_status(refresh=False) != JobStatus.STARTED or not owner or _owner_running(owner, live):
                continue
            claim = keys.job_lost(job_id, owner)
            if not client.set(claim, reaper_id, nx=True, ex=CLAIM_TTL_S):
                continue  # another worker is handling it
            try:
                done.append((job_id, _handle(client, eventlog, queue, started, job, owner, reaper_id)))
            except Exception:
                client.delete(claim)  # let the next tick (here or elsewhere) try again
                raise
    return done


def _handle(client, eventlog: EventLog, queue, started: StartedJobRegistry, job: Job, owner: str,
            reaper_id: str) -> str:
    history = eventlog.replay(job.id)
    last = history[-1] if history else None
    tokens = sum(1 for e in history if e.type == "token")
    seq = last.seq + 1 if last else 0
    pipe = client.pipeline()
    started.remove_executions(job, pipeline=pipe)
    if last is not None and last.terminal:
        # It ended (its log says so) but the worker died before RQ's bookkeeping.
        action = "closed"
        if last.type == "end":
            job.set_status(JobStatus.FINISHED, pipeline=pipe)
        else:
            record_job_failure(job, f"{last.code}: {last.message}", pipe)
    elif tokens == 0 and job.meta.get("requeues", 0) < MAX_REQUEUES:
        action = "requeued"
        job.meta["requeues"] = job.meta.get("requeues", 0) + 1
        job.save_meta()
        story = dict(actor=reaper_id, action="requeue", target=job.id,
                     human=f"Worker {inferq_worker_id(owner)} was lost before the first token; "
                           "the job goes back to the front of its queue")
        eventlog.append_many([Narration(job_id=job.id, seq=seq, **story),
                              Queued(job_id=job.id, seq=seq + 1, position=0, queue=queue.name)])
        pipe.execute()
        pipe = client.pipeline()  # RQ's enqueue_job opens its own MULTI on a fresh pipeline
        queue.enqueue_job(job, pipeline=pipe, at_front=True)
    else:
        action = "failed"
        message = (f"worker {inferq_worker_id(owner)} was lost (stopped heartbeating or lost Redis) "
                   f"after {tokens} tokens; "
                   "the job can be submitted again")
        eventlog.append(Error(job_id=job.id, seq=seq, code="WORKER_LOST", message=message, retriable=True))
        record_job_failure(job, f"WORKER_LOST: {message}", pipe)
        stats.count(client, "failed", job.meta.get("model") or "unknown")
    pipe.execute()
    log.warning("job %s: worker %s lost; %s by %s", job.id, owner, action, reaper_id)
    return action
