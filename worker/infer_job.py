"""The name ``infer`` jobs carry (``queue_schema.admission.INFER_FUNC``), and what it does under plain RQ.

inferq workers never call it: they read the job's payload and decode it with
the scheduler. RQ's own ``rq worker`` pointed at an inferq queue would import
and call it, and it says why that cannot work instead of running anything.
"""
from __future__ import annotations


def run_infer(payload: dict) -> dict:
    raise RuntimeError("infer jobs run only in an inferq worker (inferq worker --model NAME=PATH), "
                       "which keeps the model loaded; RQ's own worker cannot run them")
