"""Logging set-up shared by the CLI's commands.

``INFERQ_LOG_FORMAT=json`` gives one JSON object per line with ``job_id`` and
``worker`` fields; otherwise a readable line that carries them too. Prompts
are never logged unless ``INFERQ_LOG_PROMPTS=1``.
"""
from __future__ import annotations

import json
import logging
import os

from queue_schema.log_context import ContextFilter


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                "msg": record.getMessage(), "job_id": getattr(record, "job_id", None),
                "worker": getattr(record, "worker", None)}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [f"{k}={v}" for k, v in (("worker", getattr(record, "worker", None)),
                                          ("job", getattr(record, "job_id", None))) if v]
        return f"{text} [{' '.join(tags)}]" if tags else text


def setup(level: str | None = None) -> None:
    level = (level or os.environ.get("INFERQ_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if os.environ.get("INFERQ_LOG_FORMAT", "").lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
