"""The events a job emits, one JSON object each.

Every event has ``type``, ``job_id``, ``seq`` (0, 1, 2... per job, no gaps)
and ``ts`` (ms since the epoch). A job's stream is ``queued``, ``started``,
then ``token``/``narration``/``metrics``, and ends with exactly one ``end``
or ``error``.

With ``logprobs`` asked, an ``infer`` job sends one ``token`` event per
generated token, each with ``logprob`` (and ``top_logprobs``), even when its
text ``t`` is empty: ``t`` is the text that became safe to send with that
token (held-back bytes of a character, or a possible stop string, come out
with a later token, or not at all once they turn out to be a stop string),
while ``token`` is the token's own piece. Without ``logprobs``, only tokens
that release text send an event. An ``embed`` job sends one ``embedding``
event per input, then ``metrics`` and ``end``.
"""
from __future__ import annotations

import time
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError

from queue_schema.errors import EventDecodeError

# done: an operation that generates no text (embed) finished.
StopReason = Literal["max_tokens", "eos", "stop_sequence", "cancelled", "done"]
JobErrorCode = Literal["INVALID_REQUEST", "CONTEXT_LENGTH_EXCEEDED", "MODEL_NOT_FOUND", "WORKER_LOST",
                       "TIMEOUT", "VRAM_OOM", "INFERENCE_FAILED", "CANCELLED"]
TERMINAL_TYPES = frozenset({"end", "error"})


def now_ms() -> int:
    return int(time.time() * 1000)


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    seq: int = Field(ge=0)
    ts: int = Field(default_factory=now_ms)
    # Not part of the event: the lease owner a worker writes it as (queue_schema.lifecycle.eventlog).
    _writer: str | None = PrivateAttr(None)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES  # type: ignore[attr-defined]


class Queued(_Event):
    type: Literal["queued"] = "queued"
    position: int = Field(ge=0, description="Jobs ahead of this one, higher priorities included.")
    queue: str
    eta_s: float | None = Field(None, description="Estimated wait before it starts, from recent throughput.")


class Started(_Event):
    type: Literal["started"] = "started"
    model: str
    worker: str
    queue_wait_ms: int
    run: int | None = Field(None, ge=1, description="Which take of the job this run is (1, 2...). A started "
                            "event after another one means the job began again: what came between is void.")
    # Only for a job offered tools: the call syntax its output is read with (the worker's template decides).
    tool_format: Literal["hermes", "llama3", "mistral", "json"] | None = Field(
        None, description="hermes: <tool_call>{...}</tool_call>; llama3: a JSON call; mistral: [TOOL_CALLS][...]; "
                          "json: a call forced by a grammar, one object or an array of them.")


class TopLogprob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    token: str = Field(description="The token's piece as text (bytes that are not UTF-8 replaced).")
    logprob: float
    bytes: list[int] = Field(description="The token's piece, byte by byte.")


class Token(_Event):
    type: Literal["token"] = "token"
    t: str = Field(description="Text released with this token: whole UTF-8 characters; may be empty, or hold "
                               "text held back from earlier tokens.")
    i: int = Field(ge=0, description="0-based index of the generated token.")
    # Only when the job asked for logprobs: then every generated token has its own event.
    token: str | None = Field(None, description="This token's own piece (logprobs only).")
    logprob: float | None = Field(None, description="Its log-probability under the model (logprobs only).")
    top_logprobs: list[TopLogprob] | None = Field(None, description="The most likely tokens at this step, most "
                                                                     "likely first (logprobs > 0 only).")
    bytes: list[int] | None = Field(None, description="This token's piece, byte by byte (logprobs only).")


class Embedding(_Event):
    type: Literal["embedding"] = "embedding"
    index: int = Field(ge=0, description="Which input (0-based).")
    embedding: str = Field(description="The vector, L2-normalized: base64 of little-endian float32 (OpenAI's "
                                       "encoding_format=base64).")
    dims: int = Field(ge=1)
    tokens: int = Field(ge=0, description="Tokens of this input.")


class Narration(_Event):
    type: Literal["narration"] = "narration"
    # Worker-level narration (a model loaded) belongs to no job: no job_id, no seq.
    job_id: str | None = None  # type: ignore[assignment]
    seq: int | None = Field(None, ge=0)  # type: ignore[assignment]
    actor: str
    action: str
    target: str
    human: str
    cute: str | None = None
    story: str | None = None


class Metrics(_Event):
    type: Literal["metrics"] = "metrics"
    tokens_per_sec: float
    vram_bytes: int
    prompt_tokens: int
    tokens_out: int
    cached_tokens: int = Field(0, description="Prompt tokens found in the worker's cache (not evaluated again).")


class End(_Event):
    type: Literal["end"] = "end"
    tokens_out: int
    decode_time_ms: int
    stop_reason: StopReason
    text: str


class Error(_Event):
    type: Literal["error"] = "error"
    code: JobErrorCode
    message: str
    retriable: bool = False


Event = Annotated[Union[Queued, Started, Token, Embedding, Narration, Metrics, End, Error],
                  Field(discriminator="type")]
EVENT_TYPES: dict[str, type[_Event]] = {
    cls.model_fields["type"].default: cls for cls in (Queued, Started, Token, Embedding, Narration, Metrics, End,
                                                     Error)
}
_ADAPTER: TypeAdapter = TypeAdapter(Event)


def parse_event(raw: bytes | str) -> _Event:
    """Decode one event from its JSON; EventDecodeError if it is not one."""
    try:
        return _ADAPTER.validate_json(raw)
    except ValidationError as exc:
        raise EventDecodeError(f"not an inferq event: {exc.error_count()} validation errors") from None


def event_json_schema() -> dict:
    return _ADAPTER.json_schema()
