"""Logging set-up shared by the CLI's commands."""
from __future__ import annotations

import logging
import os


def setup(level: str | None = None) -> None:
    level = (level or os.environ.get("INFERQ_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
