"""The function RQ runs for an ``infer`` job (named by ``queue_schema.jobs.INFER_FUNC``)."""
from __future__ import annotations

from rq import get_current_job

from worker import runtime
from worker.job_runner import run_job


def run_infer(payload: dict) -> dict:
    job = get_current_job()
    return run_job(runtime.current(), job.id, payload, job.meta)
