"""Advancing batches: validate the input file, submit its lines as jobs, collect results, finalize.

Run by every API process (``api/background.py``) on the batches' schedule:
a process claims a batch, takes it one step further and gives it back due
again (or finishes it). Every step can be repeated after a crash without
running a line twice or counting a result twice (see api.batch_store).

Lines run as ordinary jobs (``infer`` for the completion routes, ``embed``
for ``/v1/embeddings``) at priority ``batch``, which workers take
only when nothing interactive waits, at most ``INFERQ_BATCH_WINDOW`` of a
batch queued or running at once. They count against neither the queue bound
nor the tenant's interactive limits (a limit key of their own, ``batch:...``),
so a tenant's batch never makes its interactive requests wait or fail.
"""
from __future__ import annotations

import base64
import json
import logging
import time

from flask import current_app
from pydantic import ValidationError

from api import batch_store as batches
from api import file_store as files
from api import memory
from api.extensions import now_ms, resources
from api.jobs import request_cancel

# The OpenAI routes' own request models, answers and errors: a batch line is answered exactly as the route would.
from api.openai import answers, tool_calls
from api.openai import errors as openai_errors
from api.openai.requests import ChatRequest, CompletionRequest, EmbeddingRequest
from queue_schema import keys
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle import views as jobs
from queue_schema.lifecycle.admission import Idempotency
from queue_schema.lifecycle.tenants import NO_LIMITS, Tenant
from queue_schema.operations import OPERATIONS

log = logging.getLogger(__name__)
REQUESTS = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest,
            "/v1/embeddings": EmbeddingRequest}
EMBEDDINGS = "/v1/embeddings"
MAX_ERRORS = 100  # validation errors reported for one file
MAX_CUSTOM_ID = 512
COLLECT = 200
# Jobs whose whole log is read to answer them (embeddings: megabytes each), per pass: the rest wait for the
# next pass, so one pass never holds hundreds of logs at once.
WHOLE_LOGS = 4
FINAL_PAGE = 256  # results read per round trip while the output is written
FLOAT_BYTES = 25  # the most one float32 takes in an output line, as JSON: "-1.2345678901234567e-05, "
POLL_MS = 2000  # a batch with jobs out comes back this often (a job's end also wakes it)
BLOCKED_MS = 1000
WAITING = (ErrorCode.MODEL_OFFLINE, ErrorCode.QUEUE_FULL, ErrorCode.REDIS_UNAVAILABLE, ErrorCode.STORAGE_FULL)


def advance_due(identity: str, count: int = 10) -> int:
    """Claim due batches and take each one step further; how many were handled."""
    res = resources()
    schedule = batches.schedule(res.redis)
    claims = schedule.claim(now_ms(), count)
    for claim in claims:
        try:
            due = advance(claim.member)
        except InferqError as exc:
            log.warning("batch %s: %s; trying again shortly", claim.member, exc.message)
            due = now_ms() + BLOCKED_MS
        except Exception:  # a bug must not stall every other batch
            log.exception("batch %s: advancing failed (%s)", claim.member, identity)
            due = now_ms() + 5 * POLL_MS
        if due is None:
            schedule.finish(claim)
        else:
            schedule.reschedule(claim, due)
    return len(claims)


def advance(batch_id: str) -> int | None:
    """One step; when the batch is due again (ms), or None when it is done."""
    r = resources().redis
    batch = batches.get(r, batch_id)
    if batch is None or batch.status in batches.FINAL:
        return None
    now = now_ms()
    if batch.status == "validating":
        return _validate(batch, now)
    if batch.status == "finalizing":
        _finalize(batch, "completed", ("finalizing",), now)
        return None
    if batch.status == "in_progress" and not batch.expiring and now // 1000 >= batch.expires_at:
        r.hset(keys.batch(batch.id), "expiring", 1)
        batch.expiring = True
        log.info("batch %s: past its 24 h window; winding down", batch.id)
    _collect(batch)
    batch = batches.get(r, batch_id)
    if batch.status == "cancelling" or batch.expiring:
        _cancel_outstanding(batch)
        if r.hlen(keys.batch_results(batch.id)) < batch.submitted:
            return now + BLOCKED_MS
        if batch.expiring:
            _expire_rest(batch)
            _finalize(batch, "expired", ("in_progress", "cancelling"), now)
        else:
            _finalize(batch, "cancelled", ("cancelling",), now)
        return None
    blocked = _submit(batch)
    batch = batches.get(r, batch_id)
    if batch.submitted >= batch.total and batch.completed + batch.failed >= batch.total:
        if batches.move(r, batch.id, ("in_progress",), "finalizing", finalizing_at=now // 1000):
            _finalize(batch, "completed", ("finalizing",), now)
        return None
    return now + (BLOCKED_MS if blocked else POLL_MS)


# --- validating ---------------------------------------------------------------------------
def _validate(batch: batches.Batch, now: int) -> int | None:
    r = resources().redis
    raw = files.content(r, batch.input_file_id)
    errors: list[dict] = []
    lines: list[dict] = []
    if raw is None:
        errors.append({"code": "file_not_found", "message": f"input file {batch.input_file_id} no longer exists",
                       "param": "input_file_id", "line": None})
    else:
        try:
            raw.decode("utf-8")
            # Split as the upload counted its lines (bytes.splitlines: \n, \r\n, \r), never at U+2028,
            # U+2029 or U+0085 as str.splitlines would: JSON strings may hold those raw.
            rows = [line.decode("utf-8") for line in raw.splitlines()]
        except UnicodeDecodeError:
            rows = []
            errors.append({"code": "invalid_file", "message": "the input file is not UTF-8", "param": None,
                           "line": None})
        seen: set[str] = set()
        for number, line in enumerate(rows, 1):
            if not line.strip():
                continue
            parsed = _line(batch, number, line, seen, errors)
            if parsed is not None:
                lines.append(parsed)
            if len(errors) >= MAX_ERRORS:
                break
        if not errors and not lines:
            errors.append({"code": "empty_file", "message": "the input file holds no request", "param": None,
                           "line": None})
    if errors:
        batches.finish(r, batch, "failed", now, ("validating",), errors=json.dumps(errors))
        log.info("batch %s failed validation: %d errors", batch.id, len(errors))
        return None
    pipe = r.pipeline()
    pipe.delete(keys.batch_lines(batch.id))
    pipe.rpush(keys.batch_lines(batch.id), *(json.dumps(x, separators=(",", ":")) for x in lines))
    pipe.hset(keys.batch(batch.id), "total", len(lines))
    pipe.execute()
    if batches.move(r, batch.id, ("validating",), "in_progress", in_progress_at=now // 1000):
        log.info("batch %s: %d requests, in progress", batch.id, len(lines))
    return now


def _line(batch: batches.Batch, number: int, line: str, seen: set[str], errors: list[dict]) -> dict | None:
    """One input line as {custom_id, op} (or {custom_id, status, body} for a request that cannot run);
    None, with the reason in ``errors``, for a line that breaks the file's format."""
    def bad(code: str, message: str, param: str | None = None) -> None:
        errors.append({"code": code, "message": message, "param": param, "line": number})

    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return bad("invalid_json_line", f"line {number} is not valid JSON")
    if not isinstance(obj, dict):
        return bad("invalid_json_line", f"line {number} is not a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        return bad("missing_custom_id", f"line {number}: custom_id must be a string of 1..{MAX_CUSTOM_ID}",
                   "custom_id")
    if custom_id in seen:
        return bad("duplicate_custom_id", f"line {number}: custom_id {custom_id!r} appears twice", "custom_id")
    seen.add(custom_id)
    if obj.get("method") != "POST":
        return bad("invalid_method", f"line {number}: method must be POST", "method")
    if obj.get("url") != batch.endpoint:
        return bad("mismatched_endpoint", f"line {number}: url must be the batch's endpoint {batch.endpoint}", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return bad("missing_body", f"line {number}: body must be a JSON object", "body")
    try:
        try:
            request = REQUESTS[batch.endpoint].model_validate({**body, "stream": False})
        except ValidationError as exc:
            err = exc.errors(include_input=False, include_url=False)[0]
            param = ".".join(str(p) for p in err["loc"])
            raise openai_errors.invalid(param, f"{param}: {err['msg']}") from None
        if batch.endpoint == EMBEDDINGS:
            op = request.operation()
        else:
            if request.n != 1:  # a line is one job; n choices would be n
                raise openai_errors.invalid("n", "n must be 1 in a batch: give each choice its own line")
            op, = request.operations()
    except InferqError as exc:  # answered in the error file as the route would answer the request
        status, payload, _ = openai_errors.answer(exc)
        return {"custom_id": custom_id, "status": status, "body": payload}
    entry = {"custom_id": custom_id, "op": op.model_dump(mode="json", exclude_none=True),
             "chat": batch.endpoint == "/v1/chat/completions"}
    if batch.endpoint == EMBEDDINGS:
        entry["encoding_format"] = request.encoding_format
    return entry


# --- submitting -----------------------------------------------------------------------------
def _submit(batch: batches.Batch) -> bool:
    """Submit lines while the batch has fewer than its window out; True if admission said wait."""
    res = resources()
    r = res.redis
    window = int(current_app.config["BATCH_WINDOW"])
    out = batch.submitted - batch.completed - batch.failed
    submitted = batch.submitted
    tenant = Tenant(batch.tenant, f"batch:{batch.limit_key}")
    blocked = False
    # The lines this pass may submit, in one read.
    pending = r.lrange(keys.batch_lines(batch.id), submitted, submitted + max(0, window - out) - 1)
    for raw in pending:
        line = submitted
        entry = json.loads(raw)
        if "op" not in entry:
            _record(batch, [_result(line, _http_result(entry["custom_id"], None, entry["status"], entry["body"]),
                                    False)])
        else:
            op = OPERATIONS[entry["op"]["operation"]].model_validate(entry["op"])
            try:
                memory.check()  # a full Redis: the lines wait, as they do for a full queue
                # Priority batch is outside the queue bound (the window bounds it), hence bound 0.
                admitted = res.admission.admit(op, 0, tenant, NO_LIMITS, Idempotency(f"{batch.id}.{line}", "batch"),
                                               priority="batch", batch=batch.id)
            except InferqError as exc:
                if exc.code in WAITING:
                    blocked = True
                    break
                status, payload, _ = openai_errors.answer(exc)
                status = min(status, 500)
                payload["error"]["param"] = None
                _record(batch, [_result(line, _http_result(entry["custom_id"], None, status, payload), False)])
            else:
                r.hset(keys.batch_jobs(batch.id), mapping={str(line): admitted.job_id,
                                                            f"j:{admitted.job_id}": line})
        submitted += 1
        r.hset(keys.batch(batch.id), "submitted", submitted)
    return blocked


# --- collecting ---------------------------------------------------------------------------
def _collect(batch: batches.Batch) -> int:
    """Results of the batch's jobs whose logs ended since the last look."""
    r = resources().redis
    ended = [j.decode() for j in r.lrange(keys.batch_ended(batch.id), 0, COLLECT - 1)]
    if not ended:
        return 0
    events = resources().eventlog.redis  # the logs' store: the queue's Redis unless INFERQ_EVENTS_URL
    pipe, log_pipe = r.pipeline(transaction=False), events.pipeline(transaction=False)
    for job_id in ended:
        pipe.hget(keys.batch_jobs(batch.id), f"j:{job_id}")
        log_pipe.xrevrange(keys.job_events(job_id), count=8)
        pipe.hget(keys.job_info(job_id), "submitted")
    raw, tails = pipe.execute(), log_pipe.execute()
    mapped, kept = [], []
    for i, job_id in enumerate(ended):
        (line, submitted), entries = raw[2 * i: 2 * i + 2], tails[i]
        if line is None:  # admitted, not yet mapped (the submit step was cut short): it maps it on retry
            kept.append(job_id)
        else:
            mapped.append([job_id, int(line), entries, int(submitted or 0) // 1000])
    # The lines' requests, then the whole log of those whose answer is more than the last events, each in one
    # round trip for every job collected.
    pipe = r.pipeline(transaction=False)
    for _, line, _, _ in mapped:
        pipe.lindex(keys.batch_lines(batch.id), line)
    lines = [json.loads(raw_line or "{}") for raw_line in pipe.execute()]
    # Tool lines too: the call syntax is in their ``started`` event, at the log's head.
    whole = [i for i, entry in enumerate(lines)
             if (entry.get("op") or {}).get("operation") == "embed" or
             {"logprobs", "tools"} & set(entry.get("op") or {})]
    for i in whole[WHOLE_LOGS:]:  # left on the ended list for the next pass
        kept.append(mapped[i][0])
    keep = set(whole[WHOLE_LOGS:])
    mapped = [m for i, m in enumerate(mapped) if i not in keep]
    lines = [x for i, x in enumerate(lines) if i not in keep]
    whole = whole[:WHOLE_LOGS]
    pipe = events.pipeline(transaction=False)
    for i in whole:  # one event per vector, or per token
        pipe.xrange(keys.job_events(mapped[i][0]))
    for i, entries in zip(whole, pipe.execute()):
        mapped[i][2] = entries
    done = []
    for (job_id, line, entries, created), entry in zip(mapped, lines):
        raw_events = [json.loads(fields[b"e"]) for _, fields in entries if b"e" in fields]  # fences left out
        done.append(_job_result(batch, line, entry, job_id, raw_events, created))
    _record(batch, done)
    pipe = r.pipeline(transaction=False)
    for job_id in ended:
        if job_id not in kept:
            pipe.lrem(keys.batch_ended(batch.id), 1, job_id)
    pipe.execute()
    return len(done)


def _record(batch: batches.Batch, results: list[batches.Result]) -> int:
    return batches.record(resources().redis, batch, results, int(current_app.config["BATCH_BYTES_PER_TENANT"]))


def _result(line: int, row: dict, ok: bool, floats: int = 0) -> batches.Result:
    """A line's result, with the bytes its output line will take (``floats`` kept as base64 are written out
    as JSON numbers) and the small error kept instead when the tenant's results are at their bound."""
    size = len(json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode()) + 1 + floats * FLOAT_BYTES
    fallback = _plain_error(row["custom_id"], row["id"].removeprefix("batch_req_"), "quota_exceeded",
                            "the tenant's batch results and outputs reached INFERQ_BATCH_BYTES_PER_TENANT: this "
                            "line's result was not kept; run it again once outputs are deleted or expired")
    return batches.Result(line, row, ok, size, fallback)


def _job_result(batch: batches.Batch, line: int, entry: dict, job_id: str, raw_events: list[dict],
                created: int) -> batches.Result:
    """A line's result from its job's events (its whole log for embeddings and logprobs, else its last few),
    built as the route builds its answer."""
    custom_id = entry.get("custom_id", "")
    result = answers.JobResult()
    for event in sorted(raw_events, key=lambda e: e["seq"]):
        result.feed(event)
    cancelled = (result.end is not None and result.end["stop_reason"] == "cancelled") or \
        (result.error is not None and result.error["code"] == "CANCELLED")
    if cancelled or (result.end is None and result.error is None):
        code = "batch_expired" if batch.expiring else "batch_cancelled"
        why = "the batch expired before this request ran" if batch.expiring else "the batch was cancelled"
        return _result(line, _plain_error(custom_id, job_id, code, why), False)
    if result.error is not None:
        status, payload, _ = openai_errors.answer(openai_errors.job_failed(result.error))
        return _result(line, _http_result(custom_id, job_id, status, payload), False)
    op = entry.get("op") or {}
    if op.get("operation") == "embed":
        vectors = answers.embedding_vectors(raw_events)
        # Kept as the worker sent them (base64: a third of JSON numbers' size); written out as floats at the end.
        row = _http_result(custom_id, job_id, 200,
                           answers.embeddings(vectors, "base64", op.get("model", ""), result.prompt_tokens))
        floats = 0
        if entry.get("encoding_format", "float") == "float":
            row["_floats"] = True
            floats = sum(len(base64.b64decode(v)) // 4 for v in vectors.values())
        return _result(line, row, True, floats)
    names = tuple(tool_calls.call_names(op.get("tools")))
    answer = answers.Completions(bool(entry.get("chat")), job_id, op.get("model", ""), "logprobs" in op, created,
                                 names)
    return _result(line, _http_result(custom_id, job_id, 200, answer.whole([result])), True)


def _http_result(custom_id: str, job_id: str | None, status: int, body: dict) -> dict:
    """An output (or error file) line; a request refused before it became a job has no job id."""
    request_id = job_id or custom_id
    return {"id": f"batch_req_{request_id}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


def _plain_error(custom_id: str, job_id: str | None, code: str, message: str) -> dict:
    return {"id": f"batch_req_{job_id or custom_id}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


# --- winding down ---------------------------------------------------------------------------
def _cancel_outstanding(batch: batches.Batch) -> None:
    """Cancel the batch's jobs that have not ended (each ends, and is collected, like any other)."""
    r = resources().redis
    done = {int(k) for k in r.hkeys(keys.batch_results(batch.id))}
    lines = [str(i) for i in range(batch.submitted) if i not in done]
    if not lines:
        return
    job_ids = [j.decode() for j in r.hmget(keys.batch_jobs(batch.id), lines) if j is not None]
    for job_id, view in zip(job_ids, jobs.views(r, job_ids, resources().eventlog.redis)):
        if view is not None and view.terminal is None:
            request_cancel(job_id, view.state)


def _expire_rest(batch: batches.Batch) -> None:
    """Lines never submitted before the window ended: ``batch_expired`` in the error file."""
    r = resources().redis
    rest = []
    for line, raw in enumerate(r.lrange(keys.batch_lines(batch.id), batch.submitted, -1), batch.submitted):
        rest.append(_result(line, _plain_error(json.loads(raw)["custom_id"], None, "batch_expired",
                                               "the batch expired before this request ran"), False))
    _record(batch, rest)


def _finalize(batch: batches.Batch, to: str, from_statuses: tuple[str, ...], now: int) -> None:
    """Write the output and error files (each in input order, a piece at a time: results are read a page at a
    time and never all held), then the final status, once."""
    r = resources().redis
    ttl = int(current_app.config["FILE_TTL_S"])
    stem = batch.id.removeprefix("batch_")
    writers = {"output": files.Writer(r, f"file-{stem}-output"), "errors": files.Writer(r, f"file-{stem}-errors")}
    counts = {"output": 0, "errors": 0}
    lines = batches.result_lines(r, batch.id)
    for start in range(0, len(lines), FINAL_PAGE):
        for row in batches.results(r, batch.id, lines[start:start + FINAL_PAGE]):
            if row is None:
                continue
            name = "output" if row["error"] is None and row["response"]["status_code"] == 200 else "errors"
            writers[name].write((json.dumps(_written(row), separators=(",", ":"), ensure_ascii=False) + "\n").encode())
            counts[name] += 1
        time.sleep(0)  # expanding floats is CPU work: under gevent, let the process's streams go on meanwhile
    ids = {}
    for name, writer in writers.items():
        if counts[name]:
            writer.close(batch.tenant, files.OUTPUT, f"{batch.id}_{name}.jsonl", now, ttl)
            ids["output_file_id" if name == "output" else "error_file_id"] = writer.file_id
    if batches.finish(r, batch, to, now, from_statuses, **ids):
        log.info("batch %s %s: %d ok, %d failed", batch.id, to, counts["output"], counts["errors"])


def _written(row: dict) -> dict:
    """A kept result as its output line: embeddings asked for as floats are written out as floats here."""
    if row.pop("_floats", False):
        for item in row["response"]["body"]["data"]:
            item["embedding"] = answers.floats(item["embedding"])
    return row
