"""OpenAI's Responses API, ``/v1/responses``: create, retrieve (or stream again), cancel, delete, input_items.

One response is one ``infer`` job (priorities, queue bounds, tenants, the
dashboards all apply); its id is ``resp_<job id>``. What is stored, and for
how long, is ``api/response_store.py``; the response object and its stream
events are built from the job's log by ``api/openai/response_events.py``, so
``GET /v1/responses/{id}?stream=true&starting_after=N`` replays the log and
goes on live with event N+1, after any API process died.

- ``background: true``: the create answers at once, with the response as created (status queued); the job
  goes on whoever leaves. Otherwise the create streams (``stream: true``) or
  waits for the answer, and a client that leaves first has its job cancelled,
  as chat completions do (unless it sent an Idempotency-Key).
- A stream cut off before the job ended (the API stopping, Redis lost) ends
  with an ``error`` event (code ``stream_interrupted``, its ``sequence_number``
  the last one sent: resume after it) that the SDKs raise on; never with a
  terminal event it has not seen.
- A foreground create whose job failed answers with the error, as chat does;
  the stored response (GET) says ``failed``.
- Cancel: background responses only (OpenAI's rule); it asks the job to stop,
  waits a moment for its log to end, and answers the response as it then is.
  An ended response is answered as it is. Delete: any stored response (its
  job cancelled if still running); afterwards it is unknown.

Refused with a 400: ``background`` with ``store: false`` (nothing could read it
back), tools other than functions, input that is not text (images, files),
input items other than messages, function calls and their outputs, a
``conversation``, and a ``previous_response_id`` whose response has not ended.
Unknown fields are ignored (SDKs send many).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Annotated, Any, Literal

import redis
from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from api import auth, disconnect, limits, relay, response_store, shutdown, sse
from api.extensions import resources
from api.jobs import idempotency, request_cancel, submit
from api.openai import errors
from api.openai.requests import MODEL, JsonSchemaFormat, Text, function_only, parse, refused
from api.openai.response_events import FED, Builder, Meta, as_input, build, to_messages
from api.openai.routes import ClientGone, abandoned, cancel_open, events, queue_bound
from queue_schema import keys
from queue_schema.lifecycle import views
from queue_schema.operations import InferOperation

log = logging.getLogger(__name__)
bp = Blueprint("responses", __name__)
errors.install(bp)
DEFAULT_MAX_OUTPUT_TOKENS = 256  # as chat completions: OpenAI's own default is the model's whole window
CANCEL_WAIT_S = 5.0  # a running job stops between two tokens: the cancel's answer usually says cancelled
TEXT_PARTS = ("input_text", "output_text", "text")


# --- the request ------------------------------------------------------------------------------
class Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "output_text", "text"]
    text: Text = ""


Content = Text | Annotated[list[Part], Field(max_length=256)]


def text_parts_only(value):
    """Said before the union's branches are tried: pydantic would report the string branch's complaint."""
    for part in value if isinstance(value, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise ValueError(f"only text content is supported ({', '.join(TEXT_PARTS)}), not {kind!r}")
    return value


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content

    _parts = field_validator("content", mode="before")(text_parts_only)


class CallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: Text


class CallOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: str
    output: Content

    _parts = field_validator("output", mode="before")(text_parts_only)


ITEMS = {"message": MessageItem, "function_call": CallItem, "function_call_output": CallOutputItem}


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = Field(json_schema_extra={"enum": ["function"]})
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _function_only = field_validator("type")(lambda cls, value: function_only(value))


class NamedChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: str


class Format(JsonSchemaFormat):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None  # type: ignore[assignment]  # json_schema's only


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: Format | None = None


Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=16)]


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = MODEL
    input: Text | Annotated[list[dict[str, Any]], Field(max_length=256)] | None = None
    instructions: Text | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=64)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    metadata: Metadata | None = None
    store: bool | None = None
    background: bool | None = None
    stream: bool | None = None
    previous_response_id: str | None = None
    user: str | None = Field(None, max_length=256)
    conversation: None = None

    @field_validator("conversation", mode="before")
    @classmethod
    def _no_conversation(cls, value):
        if value is not None:
            raise ValueError("conversations are not supported: continue with previous_response_id")
        return value

    def items(self) -> list[dict]:
        """The request's input as input items (no ids yet), or OpenAI's 400 naming the item."""
        if self.input is None:
            return []
        if isinstance(self.input, str):
            return [user_message(self.input)]
        out = []
        for i, raw in enumerate(self.input):
            kind = raw.get("type", "message")
            model = ITEMS.get(kind)
            if model is None:
                raise errors.invalid(f"input[{i}].type", f"input[{i}]: items of type {kind!r} are not supported "
                                     f"(only {', '.join(ITEMS)})")
            try:
                item = model.model_validate(raw)
            except ValidationError as exc:
                err = exc.errors(include_input=False, include_url=False)[0]
                param = ".".join([f"input[{i}]", *map(str, err["loc"])])
                raise errors.invalid(param, f"{param}: {err['msg']}") from None
            out.append(normal_item(item))
        return out

    def settings(self, max_tokens: int) -> dict:
        """What the response echoes of the request."""
        fmt = self.text.format if self.text and self.text.format else None
        text = {"format": {"type": "text"}}
        if fmt is not None and fmt.type == "json_schema":
            text = {"format": {"type": "json_schema", "name": fmt.name, "schema": fmt.schema_,
                               "description": fmt.description, "strict": fmt.strict}}
        elif fmt is not None:
            text = {"format": {"type": fmt.type}}
        choice = self.tool_choice if self.tool_choice is not None else "auto"
        return {"instructions": self.instructions, "metadata": self.metadata or {},
                "tools": [t.model_dump() for t in self.tools or ()],
                "tool_choice": choice if isinstance(choice, str) else choice.model_dump(), "text": text,
                "temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p, "max_output_tokens": max_tokens,
                "parallel_tool_calls": True if self.parallel_tool_calls is None else self.parallel_tool_calls,
                "previous_response_id": self.previous_response_id, "store": self.store is not False,
                "background": bool(self.background), "user": self.user}


def user_message(text: str) -> dict:
    return {"type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_text", "text": text}]}


def normal_item(item: BaseModel) -> dict:
    """An input item as input_items lists it (its id comes later, from the job's)."""
    if isinstance(item, MessageItem):
        kind = "output_text" if item.role == "assistant" else "input_text"
        parts = [item.content] if isinstance(item.content, str) else [p.text for p in item.content]
        content = [{"type": kind, "text": t, **({"annotations": []} if kind == "output_text" else {})} for t in parts]
        return {"type": "message", "role": item.role, "status": "completed", "content": content}
    if isinstance(item, CallItem):
        return {"type": "function_call", "status": "completed", "call_id": item.call_id, "name": item.name,
                "arguments": item.arguments}
    output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
    return {"type": "function_call_output", "status": "completed", "call_id": item.call_id, "output": output}


ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def with_ids(items: list[dict], job_id: str, first: int) -> list[dict]:
    """New input items named after their response's job and their place in the conversation."""
    return [{"id": f"{ID_PREFIX[it['type']]}_{job_id}_{first + i}", **it} for i, it in enumerate(items)]


# --- the operation ------------------------------------------------------------------------------
_PARAMS = {"messages": "input", "json_schema": "text.format", "max_tokens": "max_output_tokens"}


def operation(req: ResponseRequest, conversation: list[dict], settings: dict) -> InferOperation:
    fields: dict = {"operation": "infer", "model": req.model, "max_tokens": settings["max_output_tokens"],
                    "messages": to_messages(conversation, req.instructions), "temperature": settings["temperature"],
                    "top_p": settings["top_p"], "top_k": 0, "repetition_penalty": 1.0}  # OpenAI has neither
    fmt = req.text.format if req.text and req.text.format else None
    if fmt is not None and fmt.type != "text":
        fields["json_schema"] = (fmt.schema_ if fmt.type == "json_schema" else None) or {"type": "object"}
    if req.tools:  # a tool_choice without tools is ignored: SDKs send one by default
        fields["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                           for t in req.tools]
        choice = req.tool_choice
        if choice is not None:
            fields["tool_choice"] = choice if isinstance(choice, str) else \
                {"type": "function", "function": {"name": choice.name}}
        if req.parallel_tool_calls is not None:
            fields["parallel_tool_calls"] = req.parallel_tool_calls
    if req.user:
        fields["metadata"] = {"user": req.user}
    try:
        return InferOperation.model_validate(fields)
    except ValidationError as exc:  # the contract refused what the request became: name the request's field
        raise refused(exc, _PARAMS, None) from None


def previous(response_id: str) -> list[dict]:
    """The conversation a response continues: its input items, then its output."""
    res = resources()
    record = response_store.find(res.redis, res.eventlog, response_id, "previous_response_id")
    made = build(record.meta, response_store.log_events(res.eventlog, record.job_id))
    if not made.ended:
        raise errors.invalid("previous_response_id", f"response {response_id} has not ended (status {made.status}): "
                             "continue it once it has")
    return record.input + as_input(made.output)


# --- routes -------------------------------------------------------------------------------------
@bp.post("/v1/responses")
def create():
    req = parse(ResponseRequest, request.get_data())
    background, store = bool(req.background), req.store is not False
    if background and not store:
        raise errors.invalid("background", "background mode needs store: true (a background response is read back "
                             "by its id)", "invalid_value")
    before = previous(req.previous_response_id) if req.previous_response_id else []
    new = req.items()
    settings = req.settings(req.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS)
    op = operation(req, before + new, settings)
    idem = idempotency(request.path, req.model_dump_json())
    if not background:
        op, = queue_bound([op], idem)
    holds = bool(req.stream) or not background  # the answer holds the connection until the job ends
    release = limits.stream_slot() if holds else (lambda: None)
    res = resources()
    try:
        admitted = submit(op, idem)
        job_id = admitted.job_id
        try:
            submitted = res.redis.hget(keys.job_info(job_id), "submitted")
            meta = Meta(job_id, int(submitted) // 1000 if submitted else int(time.time()), op.model, settings)
            if store:
                record = response_store.Record(meta, auth.principal().tenant.name, before + with_ids(new, job_id,
                                                                                                     len(before)))
                response_store.save(res.redis, record, 2 * res.settings.job_ttl_s + op.timeout_s)
        except Exception:
            if not admitted.replayed:
                cancel_open([job_id])  # a response nobody can read back: free the worker
            raise
    except Exception:
        release()
        raise
    headers = {"X-Inferq-Job-Id": job_id}
    leaving_cancels = not background and idem is None
    if req.stream:
        return _sse(meta, -1, leaving_cancels, release, headers)
    if background:
        # As created (OpenAI's answer is always queued here): a quick worker may have begun already, and
        # the answer must not depend on that race. GET says how it goes on.
        created = Builder(meta)
        created.feed({"type": "queued"})
        return jsonify(created.response()), 200, headers
    try:
        return _wait(meta, disconnect.watcher() if leaving_cancels else None, headers)
    finally:
        release()


@bp.get("/v1/responses/<response_id>")
def retrieve(response_id: str):
    res = resources()
    record = response_store.find(res.redis, res.eventlog, response_id)
    if request.args.get("stream", "").lower() in ("true", "1"):
        try:
            after = int(request.args.get("starting_after", -1))
        except ValueError:
            raise errors.invalid("starting_after", "starting_after must be an integer") from None
        release = limits.stream_slot()
        return _sse(record.meta, after, False, release, {})
    return jsonify(_built(record.meta).response())


@bp.post("/v1/responses/<response_id>/cancel")
def cancel(response_id: str):
    res = resources()
    record = response_store.find(res.redis, res.eventlog, response_id)
    if not record.meta.background:
        raise errors.invalid(None, "only background responses can be cancelled; this one ends when its client "
                             "leaves", "invalid_request")
    made = _built(record.meta)
    if not made.ended and _cancel_job(record.job_id):
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline:
            last = res.eventlog.last(record.job_id)
            if last is not None and last.terminal:
                break
            time.sleep(0.1)
        made = _built(record.meta)
    return jsonify(made.response())


@bp.delete("/v1/responses/<response_id>")
def delete(response_id: str):
    res = resources()
    record = response_store.find(res.redis, res.eventlog, response_id)
    _cancel_job(record.job_id)
    response_store.delete(res.redis, response_id)
    return jsonify(id=response_id, object="response.deleted", deleted=True)


@bp.get("/v1/responses/<response_id>/input_items")
def input_items(response_id: str):
    res = resources()
    items = response_store.find(res.redis, res.eventlog, response_id).input
    args = request.args
    try:
        limit = int(args.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise errors.invalid("limit", "limit must be an integer from 1 to 100")
    order = args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise errors.invalid("order", "order must be asc or desc")
    if order == "desc":
        items = items[::-1]
    after = args.get("after")
    if after:
        ids = [it["id"] for it in items]
        if after not in ids:
            raise errors.invalid("after", f"no input item {after!r} in this response")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return jsonify(object="list", data=page, first_id=page[0]["id"] if page else None,
                   last_id=page[-1]["id"] if page else None, has_more=len(items) > limit)


# --- answers ------------------------------------------------------------------------------------
def _built(meta: Meta) -> Builder:
    """The response as its log says now; a log that ended pins its record's TTL to the log's."""
    res = resources()
    made = build(meta, response_store.log_events(res.eventlog, meta.job_id))
    _pin(meta, made)
    return made


def _pin(meta: Meta, made: Builder) -> None:
    if made.ended and meta.settings.get("store", True):
        response_store.pin(resources().redis, meta.id, made.end or made.error, resources().settings.job_ttl_s)


def _cancel_job(job_id: str) -> bool:
    """Ask a job that has not ended to stop; False if it had ended."""
    view = views.views(resources().redis, [job_id], resources().eventlog.redis)[0]
    if view is None or view.terminal is not None:
        return False
    request_cancel(job_id, view.state)
    return True


def _wait(meta: Meta, gone, headers: dict):
    """The whole response once the job ended; a client that leaves first has its job cancelled."""
    made = Builder(meta)
    try:
        for event in events(meta.job_id, gone):
            made.feed(event)
            if made.ended:
                break
        else:
            raise errors.interrupted(meta.job_id)
    except ClientGone:
        return abandoned([meta.job_id])
    _pin(meta, made)
    if made.error is not None and made.status == "failed":
        raise errors.job_failed(made.error)
    return jsonify(made.response()), 200, headers


def _sse(meta: Meta, after: int, cancel_on_disconnect: bool, release, headers: dict):
    response = Response(stream_with_context(_stream(meta, after, cancel_on_disconnect)),
                        mimetype="text/event-stream",
                        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(release)
    return response


def _frame(event: dict) -> str:
    return sse.frame(json.dumps(event, ensure_ascii=False), event["type"])


def _stream(meta: Meta, after: int, cancel_on_disconnect: bool):
    """The response's stream events numbered above ``after``, from its job's log and then live.

    Built from the whole log every time (``relay.job_batches`` from seq -1), so the numbers are
    the log's alone. Cut off before the job ended: an ``error`` event, never a terminal one.
    """
    made, done, sent = Builder(meta), False, after
    keepalive = float(current_app.config["KEEPALIVE_S"])
    try:
        try:
            for frames in relay.job_batches(meta.job_id, -1, keepalive):
                if not frames:
                    yield sse.KEEPALIVE
                    continue
                out = []
                for frame in frames:
                    if frame.type not in FED:
                        continue
                    for event in made.feed(json.loads(frame.data)):
                        if event["sequence_number"] > after:
                            out.append(_frame(event))
                            sent = event["sequence_number"]
                    if made.ended:
                        done = True
                        break
                if out:
                    yield "".join(out)
                if done:
                    break
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("response %s: its stream lost Redis: %s", meta.id, exc)
        if done:
            try:
                _pin(meta, made)
            except redis.RedisError:
                log.warning("response %s: could not pin its record's TTL", meta.id)
        else:
            done = True  # said so to the client: the job goes on, nobody cancels it
            _, body, _ = errors.answer(errors.interrupted(meta.job_id))
            yield _frame({"type": "error", "sequence_number": sent, "code": body["error"]["code"],
                          "message": body["error"]["message"], "param": None, "error": body["error"]})
    finally:
        if not done and cancel_on_disconnect and not shutdown.stopping.is_set():
            cancel_open([meta.job_id])  # the client went away mid-stream: free the worker
