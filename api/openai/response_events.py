"""OpenAI's Responses objects and stream events, built from one job's log: nothing here reads Redis or knows Flask.

A response is one ``infer`` job. ``Builder`` is fed the job's events (as
dicts, in log order) and answers each with the stream events it makes, each
numbered (``sequence_number``) from 0 in the order made; ``response()`` is the
Response object as of the events fed so far. The same log always makes the
same events, numbers, item ids and call ids, so a stream resumed with
``starting_after=N`` is the log replayed from its start with the events
numbered up to N left out, and a GET is the whole log folded.

What the log's events make:

- the first ``queued``: ``response.created`` (status queued) and, for a
  background response, ``response.queued``; a job put back on its queue
  later (a worker stopped before its first token) makes no event;
- a ``started`` naming another run than the one before, once output was made: ``response.failed`` (the
  job began again after a take was lost: its output so far is void, and two runs are never spliced);
- the first ``started``: ``response.in_progress``; a job offered tools
  (``tool_format``) has its text read for calls (``api/openai/tool_calls.py``);
- text: the message item (``msg_<job>``) is added at its first character,
  with its one ``output_text`` part, then a delta per piece; calls come at
  the job's end (one bad call spoils them all), each a ``function_call`` item
  (``fc_<job>_<i>``) with its arguments in the pieces the model wrote them;
- ``end``: the open items are done, then ``response.completed``, or
  ``response.incomplete`` (stopped at max_output_tokens, reason
  ``max_output_tokens``); a cancelled job ends with ``response.incomplete``
  too, carrying the response in status ``cancelled``: OpenAI's stream has no
  event of its own for a cancellation, and neither "completed" nor "failed"
  would be true;
- ``error``: the open items are done (incomplete), then ``response.failed``
  with the error (a job error CANCELLED: as a cancelled end).

``to_messages`` turns Responses input items into the contract's chat
messages; ``as_input`` turns a response's output items into input items,
for the next response of a conversation (``previous_response_id``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from api.openai import tool_calls

FED = frozenset({"queued", "started", "token", "metrics", "end", "error"})  # the log events a response reads
TERMINAL = {"completed": "response.completed", "incomplete": "response.incomplete",
            "cancelled": "response.incomplete", "failed": "response.failed"}
# A job's error code as the Response's error code (OpenAI's list has no finer one for a server's failure).
ERROR_CODES = {"CONTEXT_LENGTH_EXCEEDED": "invalid_prompt", "INVALID_REQUEST": "invalid_prompt"}


@dataclass(frozen=True)
class Meta:
    """What a response says besides its log: who it is and the request's settings it echoes."""

    job_id: str
    created_at: int  # the job's submit time, s
    model: str
    settings: dict = field(default_factory=dict)  # instructions, metadata, tools, tool_choice, text... (echoed)

    @property
    def id(self) -> str:
        return "resp_" + self.job_id

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(t["name"] for t in self.settings.get("tools") or ())

    @property
    def background(self) -> bool:
        return bool(self.settings.get("background"))


class Builder:
    """One response's stream events and object, from its job's events fed in log order."""

    def __init__(self, meta: Meta):
        self.meta = meta
        self.seq = 0
        self.status: str | None = None  # None until the first event: queued, in_progress, then how it ended
        self.announced = False  # response.in_progress was sent
        self.reader: tool_calls.ToolStream | None = None
        self.output: list[dict] = []
        self.message: dict | None = None  # the open message item
        self.call: dict | None = None  # the open function_call item
        self.prompt_tokens = self.cached_tokens = 0
        self.run: int | None = None  # the take of the job its last ``started`` named
        self.end: dict | None = None
        self.error: dict | None = None

    @property
    def ended(self) -> bool:
        return self.end is not None or self.error is not None

    # --- feeding ------------------------------------------------------------------------
    def feed(self, event: dict) -> list[dict]:
        """The stream events one log event makes (none for events a response does not read)."""
        kind = event.get("type")
        if kind not in FED or self.ended:
            return []
        out: list[dict] = []
        if self.status is None:
            self.status = "queued"
            out.append(self._lifecycle("response.created"))
            if self.meta.background:
                out.append(self._lifecycle("response.queued"))
        if kind == "queued":
            if self.status == "in_progress" and not self.output:
                self.status = "queued"  # put back on its queue before it wrote anything
        elif kind == "started":
            if self.run is not None and event.get("run") != self.run and self.output:
                # A later take of the job, after a lost one wrote part of the output: no splice of two runs.
                self.error = {"code": "WORKER_LOST", "message": "the job began again after part of its output "
                              "was sent (its earlier run was lost); create the response again"}
                return out + self._finish("failed")
            self.run = event.get("run")
            self.status = "in_progress"
            if self.reader is None and event.get("tool_format") and self.meta.tool_names:
                self.reader = tool_calls.ToolStream(event["tool_format"], self.meta.tool_names)
            if not self.announced:
                self.announced = True
                out.append(self._lifecycle("response.in_progress"))
        elif kind == "token" and event.get("t"):
            self.status = "in_progress"
            out += self._deltas(self.reader.feed(event["t"]) if self.reader else [tool_calls.ContentDelta(event["t"])])
        elif kind == "metrics":
            self.prompt_tokens, self.cached_tokens = event.get("prompt_tokens", 0), event.get("cached_tokens", 0)
        elif kind == "end":
            out += self._deltas(self.reader.close()) if self.reader else []
            self.end = event
            reason = event.get("stop_reason")
            out += self._finish("cancelled" if reason == "cancelled" else
                                "incomplete" if reason == "max_tokens" else "completed")
        elif kind == "error":
            self.error = event
            out += self._finish("cancelled" if event.get("code") == "CANCELLED" else "failed")
        return out

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _lifecycle(self, kind: str) -> dict:
        return self._event(kind, response=self.response())

    def _deltas(self, deltas) -> list[dict]:
        out: list[dict] = []
        for d in deltas:
            if isinstance(d, tool_calls.ContentDelta):
                if not d.text:
                    continue
                if self.message is None:
                    out += self._open_message()
                part = self.message["content"][0]
                part["text"] += d.text
                out.append(self._event("response.output_text.delta", item_id=self.message["id"],
                                       output_index=self._index(self.message), content_index=0, delta=d.text,
                                       logprobs=[]))
            elif isinstance(d, tool_calls.CallStart):
                out += self._close_message("completed") + self._close_call()
                self.call = {"id": f"fc_{self.meta.job_id}_{d.index}", "type": "function_call", "status": "in_progress",
                             "call_id": tool_calls.call_id(self.meta.id, d.index), "name": d.name, "arguments": ""}
                self.output.append(self.call)
                out.append(self._event("response.output_item.added", output_index=self._index(self.call),
                                       item=copy.deepcopy(self.call)))
            else:
                self.call["arguments"] += d.text
                out.append(self._event("response.function_call_arguments.delta", item_id=self.call["id"],
                                       output_index=self._index(self.call), delta=d.text))
        return out

    def _open_message(self) -> list[dict]:
        self.message = {"id": f"msg_{self.meta.job_id}", "type": "message", "status": "in_progress",
                        "role": "assistant", "content": []}
        self.output.append(self.message)
        added = self._event("response.output_item.added", output_index=self._index(self.message),
                            item=copy.deepcopy(self.message))
        part = {"type": "output_text", "text": "", "annotations": []}
        self.message["content"].append(part)
        return [added, self._event("response.content_part.added", item_id=self.message["id"],
                                   output_index=self._index(self.message), content_index=0, part=dict(part))]

    def _close_message(self, status: str) -> list[dict]:
        item, self.message = self.message, None
        if item is None:
            return []
        item["status"] = status
        index, part = self._index(item), item["content"][0]
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"], logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=copy.deepcopy(part)),
                self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item))]

    def _close_call(self) -> list[dict]:
        item, self.call = self.call, None
        if item is None:
            return []
        item["status"] = "completed"  # calls come only whole: a call that is there is complete
        index = self._index(item)
        return [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            arguments=item["arguments"]),
                self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item))]

    def _finish(self, status: str) -> list[dict]:
        out = self._close_message("completed" if status == "completed" else "incomplete") + self._close_call()
        if not self.output and status in ("completed", "incomplete"):
            out += self._open_message() + self._close_message("completed" if status == "completed" else "incomplete")
        self.status = status
        return out + [self._lifecycle(TERMINAL[status])]

    def _index(self, item: dict) -> int:
        return next(i for i, o in enumerate(self.output) if o is item)

    # --- the object ---------------------------------------------------------------------
    def response(self) -> dict:
        """The Response object as of the events fed so far."""
        s, status = self.meta.settings, self.status or "queued"
        out = {
            "id": self.meta.id, "object": "response", "created_at": self.meta.created_at, "status": status,
            "background": self.meta.background,
            "completed_at": self.end["ts"] // 1000 if status == "completed" and self.end.get("ts") else None,
            "error": self._error() if status == "failed" else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": s.get("instructions"), "max_output_tokens": s.get("max_output_tokens"),
            "max_tool_calls": None, "metadata": s.get("metadata") or {}, "model": self.meta.model,
            "output": copy.deepcopy(self.output), "parallel_tool_calls": s.get("parallel_tool_calls", True),
            "previous_response_id": s.get("previous_response_id"), "prompt_cache_key": None,
            "reasoning": {"effort": None, "summary": None}, "safety_identifier": None, "service_tier": "default",
            "store": s.get("store", True), "temperature": s.get("temperature", 1.0),
            "text": s.get("text") or {"format": {"type": "text"}}, "tool_choice": s.get("tool_choice", "auto"),
            "tools": s.get("tools") or [], "top_logprobs": 0, "top_p": s.get("top_p", 1.0), "truncation": "disabled",
            "usage": self._usage(), "user": s.get("user"),
        }
        return out

    def _error(self) -> dict:
        e = self.error or {}
        code = e.get("code", "INFERENCE_FAILED")
        return {"code": ERROR_CODES.get(code, "server_error"), "message": f"{e.get('message', '')} ({code})"}

    def _usage(self) -> dict | None:
        if self.end is None:
            return None
        out_tokens = self.end.get("tokens_out", 0)
        return {"input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": self.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": out_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + out_tokens}


def build(meta: Meta, events) -> Builder:
    """A builder fed a whole (or partial) log."""
    b = Builder(meta)
    for event in events:
        b.feed(event)
    return b


# --- conversations ------------------------------------------------------------------------
def as_input(output: list[dict]) -> list[dict]:
    """A response's output items as input items of the next response (their ids kept)."""
    items = []
    for item in output:
        if item["type"] == "message":
            items.append({"id": item["id"], "type": "message", "role": "assistant", "status": item["status"],
                          "content": [{"type": "output_text", "text": p["text"], "annotations": []}
                                      for p in item["content"]]})
        elif item["type"] == "function_call":
            items.append({k: item[k] for k in ("id", "type", "status", "call_id", "name", "arguments")})
    return items


def item_text(content) -> str:
    return content if isinstance(content, str) else "".join(p.get("text") or "" for p in content)


def to_messages(items: list[dict], instructions: str | None = None) -> list[dict]:
    """Input items as the contract's chat messages: ``instructions`` first, as a system message; a
    ``function_call`` joins the assistant turn just before it (content, then calls, as a model writes
    them) or starts one; a ``function_call_output`` is a ``tool`` message."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] in ("system", "developer") else item["role"]
            messages.append({"role": role, "content": item_text(item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item_text(item["output"])})
    return messages
