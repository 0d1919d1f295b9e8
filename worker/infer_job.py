"""The function RQ runs for an ``infer`` job (named by ``queue_schema.jobs.INFER_FUNC``)."""
from __future__ import annotations

from rq import get_current_job

from queue_schema.operations import InferOperation
from worker import runtime
from worker.job_runner import run_job


def run_infer(payload: dict) -> dict:
    job = get_current_job()
    op = InferOperation.model_validate(payload)
    return run_job(runtime.current(), job.id, op, job.meta)
