"""OpenAI's answers, built from a job's events: the one builder the routes, their streams and batch lines use.

A job's log says everything an answer holds: its tokens (with logprobs when
asked), its prompt's size (``metrics``) and how it ended (``end`` or
``error``). ``JobResult`` folds a job's events as they come; ``Completions``
turns results into OpenAI's completion or chat-completion objects (whole, or
as stream chunks); ``embeddings`` builds the embeddings list from a job's
vectors. Nothing here reads Redis or knows Flask.
"""
from __future__ import annotations

import base64
import struct
import time
from dataclasses import dataclass, field

from api.openai import errors, tool_calls

FINISH = {"eos": "stop", "stop_sequence": "stop", "cancelled": "stop", "max_tokens": "length"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class JobResult:
    """What a job's events add up to, fed one event (as a dict) at a time."""

    tokens: list[dict] = field(default_factory=list)  # token events with logprobs, in order
    prompt_tokens: int = 0
    end: dict | None = None
    error: dict | None = None
    tool_format: str | None = None  # the job was offered tools: its text is read for calls in this syntax
    run: int | None = None  # which take of the job the events are of (its last ``started``)
    restarted: bool = False  # a later take began after an earlier one's events: what came before is void

    def feed(self, event: dict) -> bool:
        """Take one event; True once the job's log has ended."""
        kind = event["type"]
        if kind == "token" and "logprob" in event:
            self.tokens.append(event)
        elif kind == "started":
            self.tool_format = event.get("tool_format")
            if self.run is not None and event.get("run") != self.run:
                self.restarted = True
                self.tokens.clear()
            self.run = event.get("run")
        elif kind == "metrics":
            self.prompt_tokens = event["prompt_tokens"]
        elif kind == "end":
            self.end = event
        elif kind == "error":
            self.error = event
        return self.end is not None or self.error is not None

    @property
    def finish_reason(self) -> str:
        return FINISH[self.end["stop_reason"]]

    @property
    def completion_tokens(self) -> int:
        return self.end["tokens_out"] if self.end else 0

    def raise_failure(self) -> None:
        """OpenAI's error for a job that failed (an ``error`` event); nothing for one that ended."""
        if self.error is not None:
            raise errors.job_failed(self.error)


# --- logprobs in OpenAI's two shapes ---------------------------------------------------------
def chat_logprob(event: dict) -> dict:
    return {"token": event["token"], "logprob": event["logprob"], "bytes": event["bytes"],
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}
                             for t in event.get("top_logprobs", [])]}


def legacy_logprobs(events: list[dict], offset: int = 0) -> dict:
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


def tool_calls_of(calls, key: str) -> list[dict]:
    """OpenAI's ``tool_calls`` for parsed calls; ids follow from ``key`` (a choice of a job) and the call's
    place, so an answer built again from the same log names its calls alike."""
    return [{"id": tool_calls.call_id(key, i), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls)]


class Completions:
    """One answer of ``/v1/completions`` (``chat=False``) or ``/v1/chat/completions``: what differs between the
    two is here, once, for whole answers and stream chunks alike. ``tool_names`` are the functions the request
    offered: a chat choice whose job was read for calls (``JobResult.tool_format``) answers with the valid ones."""

    def __init__(self, chat: bool, job_id: str, model: str, logprobs: bool = False, created: int | None = None,
                 tool_names: tuple[str, ...] = ()):
        self.chat, self.model, self.logprobs = chat, model, logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + job_id
        self.created = int(time.time()) if created is None else created
        self.tool_names = tool_names

    def call_key(self, index: int) -> str:
        return f"{self.id}/{index}"

    def tool_stream(self, result: JobResult) -> tool_calls.ToolStream | None:
        """A chat choice's call reader, once its ``started`` event said it was offered tools."""
        if not (self.chat and result.tool_format):
            return None
        return tool_calls.ToolStream(result.tool_format, self.tool_names)

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, tokens: list[dict], offset: int = 0) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": [chat_logprob(e) for e in tokens], "refusal": None}
        return legacy_logprobs(tokens, offset)

    # --- whole answers ----------------------------------------------------------------
    def choice(self, index: int, result: JobResult) -> dict:
        text, finish, lp = result.end["text"], result.finish_reason, self._logprobs(result.tokens)
        if self.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            parsed = tool_calls.parse(text, result.tool_format, self.tool_names) if result.tool_format else None
            if parsed is not None and parsed.calls:
                message.update(content=parsed.content, tool_calls=tool_calls_of(parsed.calls, self.call_key(index)))
                finish = "tool_calls"
            return {"index": index, "message": message, "logprobs": lp, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    def whole(self, results: list[JobResult]) -> dict:
        """The answer once every choice's job ended (``results[i]`` is choice i's)."""
        choices = [self.choice(i, r) for i, r in enumerate(results)]
        total = usage(results[0].prompt_tokens if results else 0, sum(r.completion_tokens for r in results))
        return {**self._base("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": total}

    # --- stream chunks ----------------------------------------------------------------
    def first_chunk(self, index: int) -> dict | None:
        """What a chat stream says of a choice before its first token (completions say nothing)."""
        if not self.chat:
            return None
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    def tool_chunks(self, index: int, deltas) -> list[dict]:
        """Stream chunks for a call reader's deltas: content as content; a call as its id and name first,
        then its arguments in the pieces the model wrote them."""
        out = []
        for d in deltas:
            if isinstance(d, tool_calls.ContentDelta):
                delta: dict = {"content": d.text}
            elif isinstance(d, tool_calls.CallStart):
                delta = {"tool_calls": [{"index": d.index, "id": tool_calls.call_id(self.call_key(index), d.index),
                                         "type": "function", "function": {"name": d.name, "arguments": ""}}]}
            else:
                delta = {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]}
            out.append({**self._base("chat.completion.chunk"),
                        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]})
        return out

    def chunk(self, index: int, text: str | None, finish: str | None, tokens: list[dict] | None = None,
              offset: int = 0) -> dict:
        lp = self._logprobs(tokens, offset) if tokens else None
        if self.chat:
            delta = {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._base("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}


# --- embeddings ------------------------------------------------------------------------------
def embeddings(vectors: dict[int, str], encoding_format: str, model: str, prompt_tokens: int) -> dict:
    """The embeddings answer from a job's vectors (base64 float32, by input index)."""
    data = [{"object": "embedding", "index": i,
             "embedding": vectors[i] if encoding_format == "base64" else floats(vectors[i])}
            for i in sorted(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def embedding_vectors(events: list[dict]) -> dict[int, str]:
    return {e["index"]: e["embedding"] for e in events if e["type"] == "embedding"}


def floats(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))
