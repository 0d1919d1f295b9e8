"""Batches (OpenAI's Batch API): a file of requests, each run as an ordinary job at priority ``batch``.

All of a batch's state is in Redis, so its progress survives any API or
worker restart: the batch hash (status, counts, timestamps, how many lines
were submitted), its validated lines, the line -> job map, the results
collected so far (one per line, written once: HSETNX) and the ids of its
jobs whose logs ended and await collection (pushed by the terminal append,
queue_schema.lifecycle.eventlog). Advancing a batch — validating, submitting lines,
collecting results, finalizing — is the work of ``api/batch_runner.py``,
which any API process runs on the batches' schedule (queue_schema.lifecycle.schedule,
exclusive claims). Each step is safe to repeat after a crash: a line is
submitted with the idempotency key ``<batch id>.<line>`` (admission returns
the first job on a retry), a result is kept only if the line has none yet,
and a status moves only from the status it was read in (compare-and-set).

States: ``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed``,
or ``failed`` (the file did not validate), ``expired`` (past its 24 h
window: the lines not done are in the error file as ``batch_expired``),
``cancelling`` -> ``cancelled``.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import redis

from api import pages, webhooks
from queue_schema import keys
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle import scripts
from queue_schema.lifecycle.schedule import Schedule

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
WINDOW_S = 24 * 3600
CLAIM_MS = 60_000
KEEP_S = 30 * 24 * 3600  # a finished batch's record, and its index entry, stay this long
FINAL = ("completed", "failed", "expired", "cancelled")
WEBHOOK_EVENTS = {"completed": "batch.completed", "failed": "batch.failed", "expired": "batch.expired",
                  "cancelled": "batch.cancelled"}
_TIMES = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at", "expires_at")


_CREATE, _MOVE, _RECORD = scripts.load("batch_create"), scripts.load("batch_move"), scripts.load("batch_record")
_USAGE = scripts.load("batch_usage")


def schedule(client: redis.Redis) -> Schedule:
    return Schedule(client, keys.BATCHES_DUE, keys.BATCHES_CLAIMED, CLAIM_MS)


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex[:24]


@dataclass
class Batch:
    id: str
    tenant: str
    limit_key: str
    endpoint: str
    input_file_id: str
    status: str
    created_at: int
    expires_at: int
    metadata: dict | None = None
    webhook_url: str | None = None
    times: dict[str, int] = field(default_factory=dict)
    total: int = 0
    completed: int = 0
    failed: int = 0
    submitted: int = 0  # lines handed to admission (or failed before it), in order
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict] | None = None
    expiring: bool = False  # past its window: winding down to ``expired``

    def to_dict(self) -> dict:
        """OpenAI's batch object."""
        out = {"id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": None,
               "input_file_id": self.input_file_id, "completion_window": "24h", "status": self.status,
               "output_file_id": self.output_file_id, "error_file_id": self.error_file_id}
        for name in _TIMES:
            out[name] = self.times.get(name)
        out.update(created_at=self.created_at, expires_at=self.expires_at,
                   request_counts={"total": self.total, "completed": self.completed, "failed": self.failed},
                   metadata=self.metadata)
        if self.errors:
            out["errors"] = {"object": "list", "data": self.errors}
        return out


def _decode(raw: dict[bytes, bytes]) -> Batch | None:
    if not raw or b"id" not in raw:
        return None
    f = {k.decode(): v.decode() for k, v in raw.items()}

    def opt(name):
        return f.get(name) or None

    times = {name: int(f[name]) for name in _TIMES if f.get(name)}
    return Batch(f["id"], f["tenant"], f["limit_key"], f["endpoint"], f["input_file_id"], f["status"],
                 int(f["created_at"]), int(f["expires_at"]), json.loads(f["metadata"]) if opt("metadata") else None,
                 opt("webhook_url"), times, int(f.get("total", 0)), int(f.get("completed", 0)),
                 int(f.get("failed", 0)), int(f.get("submitted", 0)), opt("output_file_id"), opt("error_file_id"),
                 json.loads(f["errors"]) if opt("errors") else None, f.get("expiring") == "1")


class QuotaExceeded(InferqError):
    """A tenant's batches are at their bound: ``what`` is which (``batches`` in flight, or ``bytes``)."""

    def __init__(self, what: str, used: int, limit: int):
        code = ErrorCode.TOO_MANY_BATCHES if what == "batches" else ErrorCode.BATCH_QUOTA_EXCEEDED
        super().__init__(code, f"{what}: {used} of {limit}", retriable=True)
        self.what, self.used, self.limit = what, used, limit





def create(client: redis.Redis, tenant: str, limit_key: str, endpoint: str, input_file_id: str,
           metadata: dict | None, webhook_url: str | None, now_ms: int, max_open: int = 0,
           max_bytes: int = 0) -> Batch:
    """A new batch, ``validating``; QuotaExceeded if the tenant has ``max_open`` batches in flight, or
    ``max_bytes`` of batch results and outputs in Redis (0: no bound)."""
    batch_id = new_batch_id()
    now_s = now_ms // 1000
    fields = {"id": batch_id, "tenant": tenant, "limit_key": limit_key, "endpoint": endpoint,
              "input_file_id": input_file_id, "status": "validating", "created_at": now_s,
              "expires_at": now_s + WINDOW_S, "metadata": json.dumps(metadata) if metadata else "",
              "webhook_url": webhook_url or "", "total": 0, "completed": 0, "failed": 0, "submitted": 0,
              "result_bytes": 0}
    flat = [v for kv in fields.items() for v in kv]
    status, *rest = _CREATE(client, {"open": keys.tenant_open_batches(tenant), "files": keys.tenant_files(tenant),
                                     "batch": keys.batch(batch_id), "index": keys.tenant_batches(tenant),
                                     "due": keys.BATCHES_DUE, "tenants": keys.BATCH_TENANTS},
                            {"max_open": max_open, "max_bytes": max_bytes, "final": ",".join(FINAL), "id": batch_id,
                             "now": now_ms, "keep_ms": KEEP_S * 1000, "tenant": tenant}, more_args=flat)
    if status == 0:
        raise QuotaExceeded("batches", int(rest[0]), int(rest[1]))
    if status == -1:
        raise QuotaExceeded("bytes", int(rest[0]), int(rest[1]))
    return get(client, batch_id)


def usage(client: redis.Redis, tenant: str) -> tuple[int, int]:
    """The tenant's batches in flight and the bytes of its batch results and outputs: what ``create`` checks
    against its bounds, counted by the same Lua (lib/quota.lua)."""
    open_, held = _USAGE(client, {"open": keys.tenant_open_batches(tenant), "files": keys.tenant_files(tenant)},
                         {"final": ",".join(FINAL)})
    return int(open_), int(held)


def get(client: redis.Redis, batch_id: str) -> Batch | None:
    return _decode(client.hgetall(keys.batch(batch_id)))


def listing(client: redis.Redis, tenant: str, limit: int, after: str | None) -> tuple[list[Batch], bool] | None:
    """The tenant's batches, newest first, after the batch ``after`` (OpenAI's cursor: an id); None when
    ``after`` names no batch of the tenant's."""
    ids = pages.ids_after(client, keys.tenant_batches(tenant), after, limit)
    if ids is None:
        return None
    pipe = client.pipeline(transaction=False)
    for batch_id in ids[:limit]:
        pipe.hgetall(keys.batch(batch_id))
    found = [b for b in map(_decode, pipe.execute()) if b is not None]
    return found, len(ids) > limit





def move(client: redis.Redis, batch_id: str, from_statuses: tuple[str, ...], to: str, **fields) -> bool:
    """Compare-and-set of the status: True if the batch was in one of ``from_statuses``."""
    flat = [v for kv in fields.items() for v in kv]
    return bool(_MOVE(client, {"batch": keys.batch(batch_id)}, {"from": ",".join(from_statuses), "to": to},
                      more_args=flat))


def finish(client: redis.Redis, batch: Batch, to: str, now_ms: int, from_statuses: tuple[str, ...],
           **fields) -> bool:
    """Move to a final status, schedule its webhook and drop the working state, in one transaction."""
    if not move(client, batch.id, from_statuses, to, **{f"{to}_at": now_ms // 1000}, **fields):
        return False
    pipe = client.pipeline()
    pipe.delete(keys.batch_lines(batch.id), keys.batch_jobs(batch.id), keys.batch_ended(batch.id),
                keys.batch_results(batch.id))
    pipe.srem(keys.tenant_open_batches(batch.tenant), batch.id)  # its results are gone: they count no more
    pipe.expire(keys.batch(batch.id), KEEP_S)
    if batch.webhook_url:
        webhooks.schedule_batch_event(pipe, batch.id, batch.webhook_url, WEBHOOK_EVENTS[to], batch.tenant, now_ms)
    pipe.execute()
    return True





@dataclass(frozen=True)
class Result:
    """One line's outcome as kept until the output is written: ``body`` is stored as is; ``size`` is what
    its output line will take (more than the stored bytes for embeddings kept as base64 and written out
    as floats); ``fallback`` is kept instead when the tenant's results are at their bound."""

    line: int
    body: dict
    ok: bool
    size: int
    fallback: dict


def record(client: redis.Redis, batch: Batch, results: list[Result], max_bytes: int = 0) -> int:
    """Keep each line's result unless it has one already (a repeated step); returns how many were new."""
    if not results:
        return 0
    flat = []
    for r in results:
        flat += [r.line, _json(r.body), "completed" if r.ok else "failed", r.size, _json(r.fallback)]
    return int(_RECORD(client, {"batch": keys.batch(batch.id), "results": keys.batch_results(batch.id),
                                "open": keys.tenant_open_batches(batch.tenant)}, {"max_bytes": max_bytes},
                       more_args=flat))


def _json(value: dict) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def results(client: redis.Redis, batch_id: str, lines: list[int]) -> list[dict | None]:
    """The results of ``lines`` (None for a line with none yet), in one read."""
    if not lines:
        return []
    raw = client.hmget(keys.batch_results(batch_id), [str(i) for i in lines])
    return [json.loads(v) if v is not None else None for v in raw]


def result_lines(client: redis.Redis, batch_id: str) -> list[int]:
    """The lines that have a result, in order."""
    return sorted(int(k) for k in client.hkeys(keys.batch_results(batch_id)))
