"""Which job and worker a log line belongs to, for every line, without passing them around."""
from __future__ import annotations

import contextvars
import logging

job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("inferq_job_id", default=None)
worker_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("inferq_worker_id", default=None)


class ContextFilter(logging.Filter):
    """Adds ``job_id`` and ``worker`` attributes to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = job_id.get()
        record.worker = worker_id.get()
        return True
