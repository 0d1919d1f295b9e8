"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/embeddings``.

Each request becomes ordinary jobs (``infer``, or ``embed``; one per choice
when ``n`` > 1), so priorities, queue bounds, cancellation, ``GET /v1/jobs``
and the dashboards all apply, and they belong to the caller's tenant. An
``Idempotency-Key`` answers a repeated request with the first one's jobs
(with ``n`` > 1, each choice has a key derived from it). The request bodies
are ``api.openai_models``; unknown OpenAI fields are ignored (clients send
many); errors take OpenAI's shape.
"""
from __future__ import annotations

import base64
import json
import logging
import struct
import time

import redis
from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context
from pydantic import ValidationError

from api import auth, disconnect, lifecycle, limits, relay, sse
from api.extensions import resources
from api.jobs import idempotency, request_cancel, submit
from api.openai_models import ChatRequest, CompletionRequest, EmbeddingRequest, InvalidField, _Request
from queue_schema import keys
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle import views as jobs
from queue_schema.lifecycle.admission import Admitted, Idempotency

log = logging.getLogger(__name__)
bp = Blueprint("openai", __name__)

_FINISH = {"eos": "stop", "stop_sequence": "stop", "cancelled": "stop", "max_tokens": "length"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                503: "server_error"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def _error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "code": code,
                      "param": param}}


@bp.errorhandler(OpenAIError)
def _openai_error(exc: OpenAIError):
    return jsonify(_error_body(exc.status, exc.message, exc.code, exc.param)), exc.status, exc.headers


@bp.errorhandler(InvalidField)
def _invalid_field(exc: InvalidField):
    return jsonify(_error_body(400, exc.message, "invalid_value", exc.param)), 400


@bp.errorhandler(InferqError)
def _inferq_error(exc: InferqError):
    code = "model_not_found" if exc.code == ErrorCode.MODEL_NOT_FOUND else exc.code.value.lower()
    param = exc.errors[0]["field"] if exc.errors else None
    return jsonify(_error_body(exc.status, exc.message, code, param)), exc.status, exc.headers


@bp.errorhandler(redis.RedisError)
def _redis_error(exc):
    # Imported here to keep this change to this handler; the same test and Retry-After as api/errors.py.
    from api.errors import RETRY_AFTER_S
    from queue_schema.lifecycle.redis_errors import unavailable

    if not unavailable(exc):  # a Redis error that is a bug (a bad command, a script error): not a 503
        log.exception("unhandled Redis error")
        return jsonify(_error_body(500, "internal error; see the API log", "internal_error")), 500
    log.warning("redis unavailable: %s", exc)
    return (jsonify(_error_body(503, "the queue (Redis) is unavailable; retry shortly", "redis_unavailable")), 503,
            {"Retry-After": RETRY_AFTER_S})


def use_openai_errors(blueprint: Blueprint) -> None:
    """Errors in OpenAI's shape on another blueprint's routes too (files, batches)."""
    blueprint.register_error_handler(OpenAIError, _openai_error)
    blueprint.register_error_handler(InvalidField, _invalid_field)
    blueprint.register_error_handler(InferqError, _inferq_error)
    blueprint.register_error_handler(redis.RedisError, _redis_error)  # 503 only when Redis is unavailable


def _parse(model_cls):
    try:
        body = json.loads(request.get_data() or b"null")
    except ValueError:
        raise OpenAIError(400, "request body is not valid JSON", code="invalid_json") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise OpenAIError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "request body must be a JSON object", code="invalid_request")
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"])
        raise OpenAIError(400, f"{param}: {err['msg']}", param=param, code="invalid_value") from None


def cursor_page(listing, default_limit: int, max_limit: int, what: str):
    """OpenAI's cursor list for the caller's own things: ``limit`` and ``after`` (the last id seen) from the
    query, ``listing(redis, tenant, limit, after)`` giving ``(items, has_more)`` newest first, or None when
    ``after`` is not one of the caller's ``what``: a 404 that says so (``file_not_found``, ``batch_not_found``),
    not a quietly empty page."""
    try:
        limit = int(request.args.get("limit", default_limit))
    except ValueError:
        limit = 0
    if not 1 <= limit <= max_limit:
        raise OpenAIError(400, f"limit must be an integer from 1 to {max_limit}", param="limit",
                          code="invalid_value")
    after = request.args.get("after") or None
    page = listing(resources().redis, auth.principal().name, limit, after)
    if page is None:
        raise OpenAIError(404, f"after: no {what} {after!r} of yours (unknown, deleted or expired); page from the "
                          "start, or from the last_id of a page this API returned", param="after",
                          code=f"{what}_not_found")
    found, more = page
    data = [item.to_dict() for item in found]
    return jsonify(object="list", data=data, first_id=data[0]["id"] if data else None,
                   last_id=data[-1]["id"] if data else None, has_more=more)


WAIT_POLL_S = 1.0  # how often a request that waits for its answer looks whether its client is still there


class ClientGone(Exception):
    """The client of a request that waits for its answer closed its connection."""


def _events(job_id: str, gone=None):
    """The job's events as dicts, from its log and then live, until the terminal one; ``gone`` (a
    ``disconnect.watcher``) is asked at least every ``WAIT_POLL_S``, and ClientGone raised once it says so."""
    keepalive = float(current_app.config["KEEPALIVE_S"])
    looked = time.monotonic()
    for frames in relay.job_batches(job_id, -1, keepalive, idle_s=WAIT_POLL_S if gone else None):
        if gone is not None and time.monotonic() - looked >= WAIT_POLL_S:
            looked = time.monotonic()
            if gone():
                raise ClientGone()
        for frame in frames:
            yield json.loads(frame.data)


def _queue_bound(ops: list, idem: Idempotency | None) -> list:
    """Jobs of a request without an Idempotency-Key are of use only to the connection that waits for them:
    if that API process dies, nobody holds their ids. They carry a queue-wait bound (``ttl_s``), so a
    worker that reaches them much later ends them with TIMEOUT instead of running them for nobody."""
    ttl = int(current_app.config["OPENAI_QUEUE_TTL_S"])
    if idem is not None or ttl <= 0:
        return ops
    return [op.model_copy(update={"ttl_s": ttl}) for op in ops]


# --- logprobs in OpenAI's two shapes ---------------------------------------------------------
def _chat_logprob(event: dict) -> dict:
    return {"token": event["token"], "logprob": event["logprob"], "bytes": event["bytes"],
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}
                             for t in event.get("top_logprobs", [])]}


def _legacy_logprobs(events: list[dict], offset: int = 0) -> dict:
    """The completions route's shape: parallel lists, text offsets counted from ``offset``."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        top: dict = {}
        for t in e.get("top_logprobs", []):  # keyed by text: of two tokens that read alike, the likelier
            top.setdefault(t["token"], t["logprob"])
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out


class _Shape:
    """What differs between the completion and the chat-completion responses."""

    def __init__(self, chat: bool, job_id: str, model: str, logprobs: bool = False, created: int | None = None):
        self.chat, self.model, self.logprobs = chat, model, logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + job_id
        self.created = int(time.time()) if created is None else created

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, index: int, text: str | None, finish: str | None, first: bool = False,
              tokens: list[dict] | None = None, offset: int = 0) -> dict:
        lp = None
        if self.logprobs and tokens:
            lp = {"content": [_chat_logprob(e) for e in tokens], "refusal": None} if self.chat \
                else _legacy_logprobs(tokens, offset)
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage}

    def choice(self, index: int, text: str, finish: str, tokens: list[dict]) -> dict:
        lp = None
        if self.logprobs:
            lp = {"content": [_chat_logprob(e) for e in tokens], "refusal": None} if self.chat \
                else _legacy_logprobs(tokens)
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": lp, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    def whole(self, choices: list[dict], usage: dict) -> dict:
        return {**self._base("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": usage}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# A job that failed after it was admitted already ran (partly): the official SDKs retry 5xx answers
# on their own, which would run it again as a new job. They obey this header; clients that want
# another try resubmit themselves (the error says whether it is worth it).
_NO_RETRY = {"x-should-retry": "false"}
_JOB_STATUS = {"CONTEXT_LENGTH_EXCEEDED": 400, "INVALID_REQUEST": 400, "TIMEOUT": 504}


def _job_error(event: dict) -> OpenAIError:
    return OpenAIError(_JOB_STATUS.get(event["code"], 500), event["message"], code=event["code"].lower(),
                       headers=_NO_RETRY)


def _interrupted(job_id: str) -> OpenAIError:
    return OpenAIError(503, f"the response was cut off before the job ended (the API process is stopping, or "
                       f"lost Redis); the job itself goes on: GET /v1/jobs/{job_id}", code="stream_interrupted",
                       headers=_NO_RETRY)


def _submit_all(ops, idem: Idempotency | None) -> list[Admitted]:
    """Admit every choice's job, choice i under the key's ``Idempotency.choice(i)``, or find the one
    that key already made. If one is refused, the jobs this request admitted are cancelled and their
    keys forgotten, so a retry with the key starts afresh, as it does when a single job is refused;
    choices found by their key (another request's) are left to that request."""
    admitted: list[Admitted] = []
    try:
        for i, op in enumerate(ops):
            admitted.append(submit(op, idem.choice(i) if idem else None))
    except Exception:
        fresh = [(i, a) for i, a in enumerate(admitted) if not a.replayed]
        if idem is not None:
            tenant = auth.principal().tenant
            for i, a in fresh:
                try:
                    resources().admission.forget(tenant, idem.choice(i), a.job_id)
                except redis.RedisError:
                    log.warning("job %s: could not forget its idempotency key", a.job_id)
        _cancel_open([a.job_id for _, a in fresh])
        raise
    return admitted


def _cancel_open(job_ids: list[str]) -> None:
    try:
        for job_id, view in zip(job_ids, jobs.views(resources().redis, job_ids)):  # one round trip
            if view is not None and view.terminal is None:
                request_cancel(job_id, view.state)
    except redis.RedisError:
        log.warning("jobs %s: could not cancel them", ", ".join(job_ids))


def _respond(req: _Request, chat: bool):
    # An Idempotency-Key answers again with the first request's jobs: streamed again, or their result.
    idem = idempotency(request.path, req.model_dump_json())
    ops = _queue_bound(req.operations(), idem)
    # Streamed or waited for, the answer holds a connection until the jobs end: a slot, taken before any
    # job exists (a 429 runs nothing).
    release = limits.stream_slot()
    try:
        job_ids = [a.job_id for a in _submit_all(ops, idem)]
        # The first job's submit time, so a replayed answer is the same answer.
        submitted = resources().redis.hget(keys.job_info(job_ids[0]), "submitted")
    except Exception:
        release()
        raise
    shape = _Shape(chat, job_ids[0], ops[0].model, ops[0].logprobs is not None,
                   int(submitted) // 1000 if submitted else None)
    headers = {"X-Inferq-Job-Id": ",".join(job_ids)}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # With a key, the client means to come back for the jobs: leaving does not cancel them.
        stream = _stream(job_ids, shape, include_usage, cancel_on_disconnect=idem is None)
        response = Response(stream_with_context(stream), mimetype="text/event-stream",
                            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response.call_on_close(release)
        return response
    try:
        return _wait(job_ids, shape, headers, gone=None if idem else disconnect.watcher())
    finally:
        release()


def _wait(job_ids: list[str], shape: "_Shape", headers: dict, gone):
    """The whole answer, once every choice's job ended; a client that leaves first has its jobs cancelled
    (``gone`` is None when the client said it would come back: an Idempotency-Key)."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    try:
        for index, job_id in enumerate(job_ids):
            tokens, end = [], None
            for event in _events(job_id, gone):
                if event["type"] == "token" and "logprob" in event:
                    tokens.append(event)
                elif event["type"] == "metrics":
                    prompt_tokens = event["prompt_tokens"]
                elif event["type"] == "error":
                    _cancel_open(job_ids[index + 1:])
                    raise _job_error(event)
                elif event["type"] == "end":
                    end = event
                    break
            if end is None:
                raise _interrupted(job_id)
            completion_tokens += end["tokens_out"]
            choices.append(shape.choice(index, end["text"], _FINISH[end["stop_reason"]], tokens))
    except ClientGone:
        return _abandoned(job_ids)
    return jsonify(shape.whole(choices, _usage(prompt_tokens, completion_tokens))), 200, headers


def _abandoned(job_ids: list[str]):
    """Nobody waits for these jobs any more: free the workers. The answer goes nowhere (499, nginx's
    "client closed request", for the access log)."""
    log.info("jobs %s: their client left before the answer; cancelling them", ",".join(job_ids))
    _cancel_open(job_ids)
    return Response(status=499)


def _stream(job_ids: list[str], shape: _Shape, include_usage: bool, cancel_on_disconnect: bool = True):
    """OpenAI's chunks for the jobs' events; ``[DONE]`` only after every choice is complete.

    A job error, or a stream cut off before the jobs ended, ends with an error
    chunk in OpenAI's shape and no ``[DONE]``: the SDKs raise on it, so an
    interrupted answer never passes for a whole one. With ``n`` > 1 the
    choices' chunks interleave as their tokens come, each with its ``index``.
    Chunks made from events that arrived together go out in one write.
    """
    def data(obj) -> str:  # escaped as the job stream is: U+2028 and kin stay inside the line
        return sse.frame(json.dumps(obj, ensure_ascii=False))

    done = False
    prompt_tokens = completion_tokens = 0
    ended = set()
    offsets = [0] * len(job_ids)  # completions' text_offset, per choice
    keepalive = float(current_app.config["KEEPALIVE_S"])
    try:
        if shape.chat:
            yield "".join(data(shape.chunk(i, None, None, first=True)) for i in range(len(job_ids)))
        try:
            for batch in relay.merged_batches(job_ids, keepalive):
                if not batch:
                    yield sse.KEEPALIVE
                out = []
                for index, frame in batch:
                    if frame.type == "token":
                        event = json.loads(frame.data)
                        tokens = [event] if "logprob" in event else None
                        if event["t"] or tokens:
                            out.append(data(shape.chunk(index, event["t"], None, tokens=tokens,
                                                        offset=offsets[index])))
                        offsets[index] += len(event["t"])
                    elif frame.type == "metrics":
                        prompt_tokens = json.loads(frame.data)["prompt_tokens"]
                    elif frame.type == "error":
                        done = True
                        err = _job_error(json.loads(frame.data))
                        out.append(data(_error_body(err.status, err.message, err.code)))
                        break
                    elif frame.type == "end":
                        event = json.loads(frame.data)
                        ended.add(index)
                        completion_tokens += event["tokens_out"]
                        out.append(data(shape.chunk(index, None, _FINISH[event["stop_reason"]])))
                        if len(ended) == len(job_ids):
                            done = True
                            if include_usage:
                                out.append(data(shape.usage_chunk(_usage(prompt_tokens, completion_tokens))))
                            out.append("data: [DONE]\n\n")
                if out:
                    yield "".join(out)
                if done:
                    break
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("jobs %s: their OpenAI stream lost Redis: %s", ",".join(job_ids), exc)
        if not done:
            done = True  # said so to the client: the jobs go on, nobody cancels them
            err = _interrupted(job_ids[0])
            yield data(_error_body(err.status, err.message, err.code))
        elif len(ended) < len(job_ids):  # one choice failed: the others are of no use
            _cancel_open(job_ids)
    finally:
        if not done and cancel_on_disconnect and not lifecycle.stopping.is_set():
            _cancel_open(job_ids)  # the client went away mid-stream: free the workers


@bp.post("/v1/completions")
def completions():
    return _respond(_parse(CompletionRequest), chat=False)


@bp.post("/v1/chat/completions")
def chat_completions():
    return _respond(_parse(ChatRequest), chat=True)


@bp.post("/v1/embeddings")
def embeddings():
    """An ``embed`` job; the vectors come back as floats or (``encoding_format=base64``) as the worker
    sent them: little-endian float32, base64. An Idempotency-Key answers again with the first job's."""
    req = _parse(EmbeddingRequest)
    idem = idempotency(request.path, req.model_dump_json())
    op, = _queue_bound([req.operation()], idem)
    release = limits.stream_slot()
    try:
        job_id = submit(op, idem).job_id
        return _embeddings_answer(job_id, req, op, None if idem else disconnect.watcher())
    finally:
        release()


def _embeddings_answer(job_id: str, req: EmbeddingRequest, op, gone):
    vectors: dict[int, str] = {}
    prompt_tokens = 0
    try:
        for event in _events(job_id, gone):
            if event["type"] == "embedding":
                vectors[event["index"]] = event["embedding"]
            elif event["type"] == "metrics":
                prompt_tokens = event["prompt_tokens"]
            elif event["type"] == "error":
                raise _job_error(event)
            elif event["type"] == "end":
                if event["stop_reason"] == "cancelled":
                    raise OpenAIError(500, "the job was cancelled", code="cancelled", headers=_NO_RETRY)
                return jsonify(_embedding_list(vectors, req.encoding_format, op.model, prompt_tokens)), 200, \
                    {"X-Inferq-Job-Id": job_id}
    except ClientGone:
        return _abandoned([job_id])
    raise _interrupted(job_id)


def _embedding_list(vectors: dict[int, str], encoding_format: str, model: str, prompt_tokens: int) -> dict:
    """The embeddings answer (shared with batches) from the job's vectors by input index."""
    data = [{"object": "embedding", "index": i,
             "embedding": vectors[i] if encoding_format == "base64" else _floats(vectors[i])}
            for i in sorted(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def _floats(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))
