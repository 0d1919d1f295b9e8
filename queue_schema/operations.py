"""Operations clients submit, validated with pydantic.

``Operation`` is a union tagged by the field ``operation``; ``infer`` is the
only member today. Adding one means adding a model to ``OPERATIONS``.
"""
from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from queue_schema.errors import ErrorCode, InferqError

Priority = Literal["high", "normal", "low"]


def _integral(value: Any) -> Any:
    # JSON Schema counts 26.0 as an integer; strict mode would not. Strings and
    # booleans still fail, as strict mode intends.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_PROMPT_CHARS = 32768
MAX_METADATA_BYTES = 2048
MAX_METADATA_ITEMS = 16
MAX_METADATA_STRING = 100


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class InferOperation(BaseModel):
    """Generate text from a prompt (or chat messages) with one model."""

    # The document says what the validators enforce: exactly one of prompt/messages.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    operation: Literal["infer"]
    model: str = Field(pattern=MODEL_NAME_PATTERN, description="Name a worker serves.")
    # Omitted means None; an explicit null is refused. Typed without "| None" so the
    # document and error paths stay simple (no union branches).
    prompt: str = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)  # type: ignore[assignment]
    messages: list[ChatMessage] = Field(None, min_length=1, max_length=256)  # type: ignore[assignment]
    max_tokens: int = Field(256, ge=1, le=4096)
    temperature: float = Field(0.8, ge=0, le=2, description="0 means greedy decoding (after the repetition penalty).")
    top_p: float = Field(0.95, ge=0, le=1)
    top_k: int = Field(40, ge=0, le=100000, description="0 turns top-k off.")
    repetition_penalty: float = Field(1.1, ge=0, le=2, description="Applies at temperature 0 too; 1 turns it off.")
    seed: int = Field(-1, ge=-1, le=2**63 - 1, description="-1 picks a random seed.")
    # The limit is 100 bytes of UTF-8, which JSON Schema cannot say; 25 characters always fit.
    stop: list[Annotated[str, Field(min_length=1, json_schema_extra={"maxLength": 25})]] = Field(
        default_factory=list, max_length=4, description="Up to 4 stop strings of 1..100 bytes of UTF-8.")
    priority: Priority = "normal"
    stream: bool = True
    timeout_s: int = Field(600, ge=1, le=3600, description="Decoding deadline once started.")
    ttl_s: int = Field(None, ge=1, le=7 * 24 * 3600,  # type: ignore[assignment]
                       description="Give up (error TIMEOUT) if the job waited longer than this to start.")
    # The document's rules are the ones enforced (_metadata_rules); the 2 KB cap comes on top.
    metadata: dict[str, Any] = Field(default_factory=dict, description="Echoed back; at most 2 KB of JSON.",
                                     json_schema_extra={"maxProperties": MAX_METADATA_ITEMS,
                                                        "additionalProperties": {"type": ["string", "number",
                                                                                          "boolean", "null"],
                                                                                 "maxLength": MAX_METADATA_STRING}})

    # Called when the job ends (queue_schema/webhooks.py); the API allows only
    # the hosts in INFERQ_WEBHOOK_ALLOW_HOSTS.
    webhook_url: str = Field(None, min_length=1, max_length=2048,  # type: ignore[assignment]
                             description="POSTed a signed job.finished / job.failed / job.cancelled event.")

    @field_validator("max_tokens", "top_k", "seed", "timeout_s", "ttl_s", mode="before")
    @classmethod
    def _integral_floats(cls, value: Any) -> Any:
        return _integral(value)

    @field_validator("stop")
    @classmethod
    def _stop_sizes(cls, stop: list[str]) -> list[str]:
        for s in stop:
            if not 1 <= len(s.encode("utf-8")) <= 100:
                raise ValueError("each stop string must be 1..100 bytes of UTF-8")
        return stop

    @field_validator("metadata")
    @classmethod
    def _metadata_rules(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        if len(metadata) > MAX_METADATA_ITEMS:
            raise ValueError(f"metadata holds at most {MAX_METADATA_ITEMS} properties")
        for value in metadata.values():  # scalars only: nothing nested to walk or to echo
            if isinstance(value, str):
                if len(value) > MAX_METADATA_STRING:
                    raise ValueError(f"metadata strings are at most {MAX_METADATA_STRING} characters")
            elif isinstance(value, float) and not math.isfinite(value):
                raise ValueError("metadata numbers must be finite (JSON has no NaN or Infinity)")
            elif value is not None and not isinstance(value, (bool, int, float)):
                raise ValueError("metadata values are a string, a number, a boolean or null")
        if len(json.dumps(metadata).encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must serialize to at most {MAX_METADATA_BYTES} bytes of JSON")
        return metadata

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "InferOperation":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


OPERATIONS: dict[str, type[BaseModel]] = {"infer": InferOperation}


class JobAccepted(BaseModel):
    """Answer to a submitted operation (HTTP 202)."""

    job_id: str
    sse_url: str
    status_url: str


def _field_errors(exc: ValidationError) -> list[dict[str, str]]:
    # include_input=False: never echo the prompt (or any input) back.
    out = []
    for err in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "body"
        out.append({"field": field, "constraint": err["type"], "message": err["msg"]})
    return out


def parse_operation(body: bytes | str | dict, *, default_operation: str | None = None) -> InferOperation:
    """Validate a submitted operation; raise InferqError with a client-facing code."""
    if not isinstance(body, dict):
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise InferqError(ErrorCode.INVALID_JSON, "request body is not valid JSON") from None
        except RecursionError:  # json's decoder recurses once per nesting level
            raise InferqError(ErrorCode.INVALID_JSON, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InferqError(ErrorCode.INVALID_REQUEST, "request body must be a JSON object",
                          errors=[{"field": "body", "constraint": "type", "message": "expected an object"}])
    tag = body.get("operation", default_operation)
    if tag is None:
        raise InferqError(ErrorCode.INVALID_REQUEST, "field 'operation' is required",
                          errors=[{"field": "operation", "constraint": "missing", "message": "Field required"}])
    model_cls = OPERATIONS.get(tag) if isinstance(tag, str) else None
    if model_cls is None:
        known = ", ".join(sorted(OPERATIONS))
        raise InferqError(ErrorCode.UNSUPPORTED_OPERATION, f"unsupported operation; supported: {known}")
    try:
        return model_cls.model_validate({**body, "operation": tag})
    except ValidationError as exc:
        errors = _field_errors(exc)
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        raise InferqError(ErrorCode.INVALID_REQUEST, f"invalid request: {summary}", errors=errors) from None
