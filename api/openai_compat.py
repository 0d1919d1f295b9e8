"""OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions``.

Each request becomes an ordinary ``infer`` job, so priorities, queue bounds,
cancellation, ``GET /v1/jobs`` and the dashboards all apply. Unknown OpenAI
fields are ignored (clients send many); errors take OpenAI's shape.
"""
from __future__ import annotations

import json
import logging
import time

import redis
from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api import lifecycle, limits, relay
from api.extensions import resources
from api.jobs import idempotency, request_cancel, submit
from queue_schema import jobs, keys
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.operations import InferOperation

log = logging.getLogger(__name__)
bp = Blueprint("openai", __name__)

_FINISH = {"eos": "stop", "stop_sequence": "stop", "cancelled": "stop", "max_tokens": "length"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                503: "server_error"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


# 100 bytes of UTF-8 is the real limit; JSON Schema cannot say bytes, and 25 characters always fit.
StopString = Annotated[str, Field(min_length=1, json_schema_extra={"maxLength": 25})]


class _Request(BaseModel):
    """Fields inferq uses; OpenAI's others are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=-1, le=2**63 - 1)
    n: Literal[1] = Field(1, description="Only one choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # OpenAI's own rules for it; checked, not forwarded (the job's metadata carries `user`).
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None

    def infer_fields(self, default_max: int) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        fields = dict(model=self.model, max_tokens=self.max_completion_tokens or self.max_tokens or default_max,
                      temperature=self.temperature, top_p=self.top_p, stop=stop, stream=self.stream,
                      repetition_penalty=1.0)  # OpenAI has no repetition penalty: leave logits alone
        if self.seed is not None:
            fields["seed"] = self.seed
        if self.user:
            fields["metadata"] = {"user": self.user}
        return fields


class CompletionRequest(_Request):
    prompt: Annotated[str, Field(min_length=1, max_length=32768)] | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=32768)]], Field(min_length=1, max_length=1)]

    def operation(self) -> InferOperation:
        prompt = self.prompt if isinstance(self.prompt, str) else "".join(self.prompt)
        return _infer(prompt=prompt, **self.infer_fields(default_max=16))


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts are used, others (images...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: Annotated[str, Field(max_length=32768)] | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=32768)] | Annotated[list[ContentPart], Field(max_length=256)] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)

    def operation(self) -> InferOperation:
        roles = {"developer": "system"}
        messages = [{"role": roles.get(m.role, m.role), "content": m.text()} for m in self.messages]
        return _infer(messages=messages, **self.infer_fields(default_max=256))


def _infer(**fields) -> InferOperation:
    try:
        return InferOperation.model_validate({"operation": "infer", **fields})
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        raise OpenAIError(400, f"{'.'.join(map(str, err['loc']))}: {err['msg']}", param=str(err["loc"][0]),
                          code="invalid_value") from None


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


@bp.errorhandler(InferqError)
def _inferq_error(exc: InferqError):
    code = "model_not_found" if exc.code == ErrorCode.MODEL_NOT_FOUND else exc.code.value.lower()
    param = exc.errors[0]["field"] if exc.errors else None
    return jsonify(_error_body(exc.status, exc.message, code, param)), exc.status, exc.headers


@bp.errorhandler(redis.RedisError)
def _redis_error(exc):
    return jsonify(_error_body(503, "the queue (Redis) is unavailable; retry shortly", "redis_unavailable")), 503


def use_openai_errors(blueprint: Blueprint) -> None:
    """Errors in OpenAI's shape on another blueprint's routes too (files, batches)."""
    blueprint.register_error_handler(OpenAIError, _openai_error)
    blueprint.register_error_handler(InferqError, _inferq_error)
    blueprint.register_error_handler(redis.ConnectionError, _redis_error)
    blueprint.register_error_handler(redis.TimeoutError, _redis_error)


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


def _events(job_id: str):
    """The job's events as dicts, from its log and then live, until the terminal one."""
    keepalive = float(current_app.config["KEEPALIVE_S"])
    for frames in relay.job_batches(job_id, -1, keepalive):
        if not frames:
            yield None
        for frame in frames:
            yield json.loads(frame.data)


class _Shape:
    """What differs between the completion and the chat-completion responses."""

    def __init__(self, chat: bool, job_id: str, model: str, created: int | None = None):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + job_id
        self.created = int(time.time()) if created is None else created

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage}

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            return {**self._base("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice], "usage": usage}


def _usage(prompt_tokens: int, end: dict) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": end["tokens_out"],
            "total_tokens": prompt_tokens + end["tokens_out"]}


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


def _respond(req: _Request, chat: bool):
    op = req.operation()
    # An Idempotency-Key answers again with the first request's job: streamed again, or its result.
    idem = idempotency(request.path, req.model_dump_json())
    release = limits.stream_slot() if req.stream else None  # before the job exists: a 429 runs nothing
    try:
        job_id = submit(op, idem).job_id
    except Exception:
        if release:
            release()
        raise
    # The job's submit time, so a replayed answer is the same answer.
    submitted = resources().redis.hget(keys.job_info(job_id), "submitted")
    shape = _Shape(chat, job_id, op.model, int(submitted) // 1000 if submitted else None)
    headers = {"X-Inferq-Job-Id": job_id}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # With a key, the client means to come back for the job: leaving does not cancel it.
        stream = _stream(job_id, shape, include_usage, cancel_on_disconnect=idem is None)
        response = Response(stream_with_context(stream), mimetype="text/event-stream",
                            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response.call_on_close(release)
        return response
    prompt_tokens = 0
    for event in _events(job_id):
        if event is None:
            continue
        if event["type"] == "metrics":
            prompt_tokens = event["prompt_tokens"]
        elif event["type"] == "error":
            raise _job_error(event)
        elif event["type"] == "end":
            body = shape.whole(event["text"], _FINISH[event["stop_reason"]], _usage(prompt_tokens, event))
            return jsonify(body), 200, headers
    raise _interrupted(job_id)


def _stream(job_id: str, shape: _Shape, include_usage: bool, cancel_on_disconnect: bool = True):
    """OpenAI's chunks for the job's events; ``[DONE]`` only after a complete answer.

    A job error, or a stream cut off before the job ended, ends with an error
    chunk in OpenAI's shape and no ``[DONE]``: the SDKs raise on it, so an
    interrupted answer never passes for a whole one. Chunks made from events
    that arrived together go out in one write.
    """
    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    done = False
    prompt_tokens = 0
    keepalive = float(current_app.config["KEEPALIVE_S"])
    try:
        if shape.chat:
            yield data(shape.chunk(None, None, first=True))
        try:
            for frames in relay.job_batches(job_id, -1, keepalive):
                if not frames:
                    yield ": keep-alive\n\n"
                out = []
                for frame in frames:
                    if frame.type == "token":
                        out.append(data(shape.chunk(json.loads(frame.data)["t"], None)))
                    elif frame.type == "metrics":
                        prompt_tokens = json.loads(frame.data)["prompt_tokens"]
                    elif frame.type == "error":
                        done = True
                        err = _job_error(json.loads(frame.data))
                        out.append(data(_error_body(err.status, err.message, err.code)))
                    elif frame.type == "end":
                        done = True
                        event = json.loads(frame.data)
                        out.append(data(shape.chunk(None, _FINISH[event["stop_reason"]])))
                        if include_usage:
                            out.append(data(shape.usage_chunk(_usage(prompt_tokens, event))))
                        out.append("data: [DONE]\n\n")
                if out:
                    yield "".join(out)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("job %s: its OpenAI stream lost Redis: %s", job_id, exc)
        if not done:
            done = True  # said so to the client: the job goes on, nobody cancels it
            err = _interrupted(job_id)
            yield data(_error_body(err.status, err.message, err.code))
    finally:
        if not done and cancel_on_disconnect and not lifecycle.stopping.is_set():  # the client left: free the worker
            try:
                res = resources()
                view = jobs.view(res.redis, res.eventlog, job_id)
                if view is not None and view.terminal is None:
                    request_cancel(job_id, view.state)
            except redis.RedisError:
                log.warning("job %s: could not cancel after the client disconnected", job_id)


@bp.post("/v1/completions")
def completions():
    return _respond(_parse(CompletionRequest), chat=False)


@bp.post("/v1/chat/completions")
def chat_completions():
    return _respond(_parse(ChatRequest), chat=True)
