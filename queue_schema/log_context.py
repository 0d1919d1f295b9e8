"""Which job and worker a log line belongs to, for every line, without passing them around."""
from __future__ import annotations

import contextvars
import logging

job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("inferq_job_id", default=None)
worker_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("inferq_worker_id", default=None)
_process_worker: str | None = None  # every thread of a worker process logs as that worker


def set_process_worker(worker: str) -> None:
    global _process_worker
    _process_worker = worker


class ContextFilter(logging.Filter):
    """Adds ``job_id`` and ``worker`` attributes to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = job_id.get()
        record.worker = worker_id.get() or _process_worker
        return True
