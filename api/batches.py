"""OpenAI's Batch API: create, look up, list and cancel batches; each tenant sees its own.

A batch's progress lives in Redis and is advanced by whichever API process
claims it (api/batch_runner.py, api/batch_store.py), so any API process
answers for any batch, and restarts lose nothing.
"""
from __future__ import annotations

import logging
from typing import Annotated, Literal

from flask import Blueprint, current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, Field

from api import auth, memory
from api import batch_store as batches
from api import file_store as files
from api.extensions import now_ms, resources
from api.files import owned_file
from api.jobs import check_webhook
from api.openai import errors
from api.openai.requests import parse
from api.pages import cursor_page
from queue_schema.errors import ErrorCode, InferqError

log = logging.getLogger(__name__)
bp = Blueprint("batches", __name__)
errors.install(bp)


class BatchRequest(BaseModel):
    """OpenAI's fields inferq uses (others are ignored), plus ``webhook_url`` (in ``extra_body``)."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: Literal[batches.ENDPOINTS]
    completion_window: Literal["24h"]
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    webhook_url: str | None = Field(None, min_length=1, max_length=2048)


def owned_batch(batch_id: str) -> batches.Batch:
    batch = batches.get(resources().redis, batch_id)
    if batch is None or not auth.can_see(batch.tenant):
        raise InferqError(ErrorCode.BATCH_NOT_FOUND, f"no batch {batch_id!r}")
    return batch


@bp.post("/v1/batches")
def create_batch():
    req = parse(BatchRequest, request.get_data())
    check_webhook(req.webhook_url)
    info = owned_file(req.input_file_id)
    if info.purpose != files.INPUT:
        raise errors.invalid("input_file_id", f"file {info.id} has purpose {info.purpose!r}; a batch reads a "
                             "'batch' file")
    who = auth.principal()
    memory.check()
    cfg = current_app.config
    try:
        batch = batches.create(resources().redis, who.name, who.limit_key, req.endpoint, info.id, req.metadata,
                               req.webhook_url, now_ms(), int(cfg["MAX_BATCHES_PER_TENANT"]),
                               int(cfg["BATCH_BYTES_PER_TENANT"]))
    except batches.QuotaExceeded as exc:
        wait_s = resources().settings.retry_after.batches_s
        if exc.what == "batches":
            raise InferqError(ErrorCode.TOO_MANY_BATCHES, f"tenant {who.name!r} has {exc.used} batches in flight, "
                              f"its limit (INFERQ_MAX_BATCHES_PER_TENANT); retry when one has ended", retriable=True,
                              retry_after_s=wait_s) from None
        raise InferqError(ErrorCode.BATCH_QUOTA_EXCEEDED, f"tenant {who.name!r} keeps {exc.used} bytes of batch "
                          f"results and outputs, its limit is {exc.limit} (INFERQ_BATCH_BYTES_PER_TENANT): delete "
                          "output files, or wait for running batches to end", retriable=True,
                          retry_after_s=wait_s) from None
    log.info("batch %s created for %s from %s", batch.id, who.name, info.id)
    return jsonify(batch.to_dict())


@bp.get("/v1/batches/<batch_id>")
def get_batch(batch_id: str):
    return jsonify(owned_batch(batch_id).to_dict())


@bp.get("/v1/batches")
def list_batches():
    """The caller's batches, newest first; ``after`` is the id of the last one seen."""
    return cursor_page(batches.listing, 20, 100, "batch", ErrorCode.BATCH_NOT_FOUND)


@bp.post("/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    """Cancelling: no more lines start; the running ones are cancelled; then ``cancelled``."""
    batch = owned_batch(batch_id)
    r = resources().redis
    now = now_ms()
    if batches.move(r, batch.id, ("validating", "in_progress"), "cancelling", cancelling_at=now // 1000):
        batches.schedule(r).add(batch.id, now)
        log.info("batch %s: cancelling", batch.id)
    else:
        batch = owned_batch(batch_id)
        if batch.status not in ("cancelling", "cancelled"):
            raise InferqError(ErrorCode.BATCH_FINISHED, f"batch {batch_id} is {batch.status}; it cannot be cancelled")
    return jsonify(owned_batch(batch_id).to_dict())
