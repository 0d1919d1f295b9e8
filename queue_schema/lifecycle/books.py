"""RQ's books for inferq jobs: started, finished, failed and cancelled, as RQ itself writes them.

inferq takes jobs with its own lease script (``queue_schema.lifecycle.leases``) and runs
many at once, so RQ's worker loop is not what runs them; these functions call
RQ's own job and registry methods, so rq-dashboard, RQ's registries and its
results read inferq's jobs exactly as they read RQ's. Every ended job — failed
ones too — lands in its registry and expires after the log's TTL.

The event log is the truth about a job; these books follow it. Whoever writes
a job's terminal event closes its books afterwards, and if that process dies
in between, the reaper closes them from the log.

What RQ keeps as a job's result is its summary (tokens, stop reason, timings),
never its text or the submitter's metadata: rq-dashboard renders results, and
the text is in the event log already.
"""
from __future__ import annotations

import redis
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now

from queue_schema.events import _Event
from queue_schema.settings import DEFAULTS


def restore(client: redis.Redis, job_id: str, fields: dict[bytes, bytes]) -> Job:
    """A Job from the hash fields a lease script returned, without another read."""
    job = Job(job_id, connection=client, serializer=JSONSerializer)
    job.restore(fields)
    return job


def fetch(client: redis.Redis, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=client, serializer=JSONSerializer)
    except Exception:  # NoSuchJobError, or a hash RQ cannot read
        return None


def start(pipe, job: Job, worker_name: str) -> Execution:
    """RQ's execution record and started-registry entry for a job just taken."""
    ttl = (job.timeout or 600) + 60
    return Execution.create(job, ttl, pipe, worker_name=worker_name)


def finish(pipe, job: Job, summary: dict, worker_name: str = "", execution: Execution | None = None) -> None:
    job.ended_at = now()
    job._result = summary
    ttl = job.result_ttl if job.result_ttl is not None else DEFAULTS.job_ttl_s
    job._handle_success(ttl, pipeline=pipe, worker_name=worker_name,
                        execution_id=execution.id if execution else None,
                        execution_started_at=execution.created_at if execution else None,
                        execution_ended_at=job.ended_at)
    job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
    _end_execution(pipe, job, execution)


def fail(pipe, job: Job, reason: str, worker_name: str = "", execution: Execution | None = None) -> None:
    """Failed, in RQ's failed registry, expiring like a finished job."""
    job.ended_at = now()
    if job.failure_ttl is None:
        job.failure_ttl = DEFAULTS.job_ttl_s
    job.set_status(JobStatus.FAILED, pipeline=pipe)
    job._handle_failure(reason, pipeline=pipe, worker_name=worker_name,
                        execution_id=execution.id if execution else None,
                        execution_started_at=execution.created_at if execution else None,
                        execution_ended_at=job.ended_at)
    _end_execution(pipe, job, execution)


def cancelled(pipe, job: Job) -> None:
    """A job cancelled before it ran: RQ's cancelled registry, expiring like the others."""
    ttl = job.result_ttl if job.result_ttl is not None else DEFAULTS.job_ttl_s
    job.set_status(JobStatus.CANCELED, pipeline=pipe)
    CanceledJobRegistry(job.origin, connection=job.connection, serializer=JSONSerializer).add(job, ttl, pipe)
    pipe.expire(job.key, ttl)


def requeued(pipe, job: Job) -> None:
    """The job went back to its queue: its execution ends, RQ shows it queued."""
    _end_execution(pipe, job, None)


MAX_REQUEUES = 1  # a job lost before its first token goes back once; lost again, it fails


def may_requeue(job: Job) -> bool:
    return job.meta.get("requeues", 0) < MAX_REQUEUES


def count_requeue(job: Job) -> None:
    """Counted before anything else of a requeue is written: one cut short midway is not made again."""
    job.meta["requeues"] = job.meta.get("requeues", 0) + 1
    job.save_meta()


def give_back(client: redis.Redis, leases, job: Job, owner: str, queue_name: str, model: str) -> bool:
    """Back to the front of ``queue_name`` if ``owner`` still holds its lease (``queue_schema.lifecycle.leases``);
    ``count_requeue`` first."""
    if not leases.requeue(job.id, owner, queue_name, model):
        return False
    pipe = client.pipeline()
    requeued(pipe, job)
    pipe.execute()
    return True


ENDED = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED)


def close(pipe, job: Job, terminal: _Event, summary_: dict | None = None, reason: str | None = None,
          worker_name: str = "", execution: Execution | None = None) -> bool:
    """RQ's books for a job whose log ended with ``terminal``: finished (with ``summary_``, by default the
    terminal event's), failed (``reason``), or cancelled before it ran (written again, it is the same). Nothing
    if RQ already shows it finished or failed (a settle done again: those books are written once). True if it
    wrote them."""
    status = job.get_status(refresh=False)
    if status in ENDED:
        return False
    if terminal.type == "end" and terminal.stop_reason == "cancelled" and \
            status in (JobStatus.QUEUED, JobStatus.CANCELED, None):
        cancelled(pipe, job)
    elif terminal.type == "end":
        finish(pipe, job, summary_ or summary(terminal), worker_name, execution)
    else:
        fail(pipe, job, reason or f"{terminal.code}: {terminal.message}", worker_name, execution)
    return True


def summary(end: _Event) -> dict:
    return {"tokens_out": end.tokens_out, "stop_reason": end.stop_reason, "decode_time_ms": end.decode_time_ms}


def _end_execution(pipe, job: Job, execution: Execution | None) -> None:
    if execution is not None:
        execution.delete(job, pipe)
    else:
        StartedJobRegistry(job.origin, connection=job.connection, serializer=JSONSerializer).remove_executions(
            job, pipeline=pipe)
