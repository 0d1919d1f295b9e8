"""The names inferq jobs carry (``queue_schema.lifecycle.admission``), and what they do under plain RQ.

inferq workers never call them: they read the job's payload and run it with
the scheduler. RQ's own ``rq worker`` pointed at an inferq queue would import
and call them, and they say why that cannot work instead of running anything.
"""
from __future__ import annotations

_WHY = ("jobs run only in an inferq worker (inferq worker --model NAME=PATH), which keeps the model loaded; "
        "RQ's own worker cannot run them")


def run_infer(payload: dict) -> dict:
    raise RuntimeError(f"infer {_WHY}")


def run_embed(payload: dict) -> dict:
    raise RuntimeError(f"embed {_WHY}")
