"""OpenAI's request bodies, as inferq reads them, and the inferq operations they become.

Fields inferq uses are validated with OpenAI's own ranges; OpenAI's other
fields are accepted and ignored (clients send many). Defaults are OpenAI's:
temperature 1, top_p 1, no top-k (OpenAI has none), no repetition penalty,
presence and frequency penalties 0. ``n`` choices are ``n`` jobs with the same
prompt (seeds ``seed``, ``seed + 1``... when a seed is given).
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from api.openai import errors
from queue_schema.operations import (
    CALL_ID_PATTERN,
    FUNCTION_NAME_PATTERN,
    MAX_EMBED_INPUTS,
    MAX_EMBED_TOKENS_PER_INPUT,
    MAX_LOGIT_BIAS,
    MAX_PROMPT_CHARS,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    EmbedOperation,
    InferOperation,
)

MODEL = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_CHOICES = 4
# 100 bytes of UTF-8 is the real limit; JSON Schema cannot say bytes, and 25 characters always fit.
StopString = Annotated[str, Field(min_length=1, json_schema_extra={"maxLength": 25})]
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
# Token id (as a string) -> -100..100; the document says what the contract enforces.
LogitBias = Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]],
                      Field(json_schema_extra={"additionalProperties": False, "maxProperties": MAX_LOGIT_BIAS})]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the grammar is always strict


class ResponseFormat(BaseModel):
    """``text``; ``json_object`` (any JSON object); ``json_schema`` (JSON matching the schema, any JSON
    object when it gives none)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_for_infer(self) -> dict | None:
        if self.type == "text":
            return None
        given = self.json_schema.schema_ if self.type == "json_schema" and self.json_schema else None
        return given or {"type": "object"}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = MODEL
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=-1, le=2**63 - 1)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description=f"Choices (1..{MAX_CHOICES}), each its own job.")
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # OpenAI's own rules for it; checked, not forwarded (the job's metadata carries `user`).
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None

    def _fields(self, default_max: int, logprobs: int | None) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        fields = dict(model=self.model, max_tokens=self.max_completion_tokens or self.max_tokens or default_max,
                      temperature=self.temperature, top_p=self.top_p, top_k=0, stop=stop, stream=self.stream,
                      repetition_penalty=1.0,  # OpenAI has neither a repetition penalty nor top-k
                      presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                      logit_bias=self.logit_bias or {})
        if logprobs is not None:
            fields["logprobs"] = logprobs
        schema = self.response_format.schema_for_infer() if self.response_format else None
        if schema is not None:
            fields["json_schema"] = schema
        if self.user:
            fields["metadata"] = {"user": self.user}
        return fields

    def _operations(self, default_max: int, logprobs: int | None, **prompt) -> list[InferOperation]:
        fields = {**self._fields(default_max, logprobs), **prompt}
        out = []
        for i in range(self.n):
            seed = {} if self.seed is None or self.seed < 0 else {"seed": (self.seed + i) % 2**63}
            out.append(_infer(**fields, **seed))
        return out


class CompletionRequest(_Request):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]], Field(min_length=1, max_length=1)]
    logprobs: int | None = Field(None, ge=0, le=5, description="Alternatives per token (OpenAI's legacy shape).")

    def operations(self) -> list[InferOperation]:
        prompt = self.prompt if isinstance(self.prompt, str) else "".join(self.prompt)
        return self._operations(16, self.logprobs, prompt=prompt)


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts are used, others (images...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: Text | None = None


FunctionName = Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
CallId = Annotated[str, Field(pattern=CALL_ID_PATTERN)]


class CalledFunctionIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: FunctionName
    arguments: Text


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: CallId
    type: Literal["function"] = "function"
    function: CalledFunctionIn


# The document says what the contract's ChatMessage enforces on what a message becomes.
_MESSAGE_SHAPES = [
    {"properties": {"role": {"const": "tool"}, "tool_call_id": {"type": "string"}}, "required": ["role", "tool_call_id"],
     "not": {"required": ["tool_calls"]}},
    {"properties": {"role": {"const": "assistant"}}, "required": ["role"], "not": {"required": ["tool_call_id"]}},
    {"properties": {"role": {"enum": ["system", "developer", "user"]}}, "required": ["role"],
     "not": {"anyOf": [{"required": ["tool_calls"]}, {"required": ["tool_call_id"]}]}},
]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=lambda schema, _: schema.update(
        oneOf=_MESSAGE_SHAPES))
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[ContentPart], Field(max_length=256)] | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(min_length=1, max_length=MAX_TOOL_CALLS)] | None = None
    tool_call_id: CallId | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""

    def message(self) -> dict:
        """The contract's ChatMessage (as a dict): ``developer`` is ``system``; an assistant turn that made
        calls may have no content."""
        out: dict = {"role": "system" if self.role == "developer" else self.role}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
            if self.content is not None:
                out["content"] = self.text()
        else:
            out["content"] = self.text()
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: FunctionName
    description: Annotated[str, Field(max_length=4096)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = Field(json_schema_extra={"enum": ["function"]})  # a str: other types get a message naming them
    function: FunctionIn

    _function_only = field_validator("type")(lambda cls, value: function_only(value))


def function_only(kind: str) -> str:
    """Tools' ``type``: a plain string in the models, so other kinds (web_search...) get this message."""
    if kind != "function":
        raise ValueError(f"only function tools are supported, not {kind!r}")
    return kind


class ChoiceFunctionIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: FunctionName


class NamedChoiceIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: ChoiceFunctionIn


ToolChoice = Literal["auto", "none", "required"] | NamedChoiceIn


def tool_fields(tools: list[ToolIn] | None, tool_choice: ToolChoice | None, parallel: bool | None) -> dict:
    """The contract's tool fields; a choice without tools is ignored (SDKs send ``tool_choice`` by default)."""
    if not tools:
        return {}
    out: dict = {"tools": [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools]}
    if tool_choice is not None:
        out["tool_choice"] = tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump()
    if parallel is not None:
        out["parallel_tool_calls"] = parallel
    return out


class ChatRequest(_Request):
    # A schema for the output and tools do not go together (the contract refuses them).
    model_config = ConfigDict(extra="ignore", json_schema_extra={"not": {"required": ["tools", "response_format"]}})
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token; used with logprobs.")
    tools: Annotated[list[ToolIn], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def operations(self) -> list[InferOperation]:
        messages = [m.message() for m in self.messages]
        return self._operations(256, (self.top_logprobs or 0) if self.logprobs else None, messages=messages,
                                **tool_fields(self.tools, self.tool_choice, self.parallel_tool_calls))


EmbedText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
TokenList = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1,
                                                                           max_length=MAX_EMBED_TOKENS_PER_INPUT)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = MODEL
    input: EmbedText | Annotated[list[EmbedText], Field(min_length=1, max_length=MAX_EMBED_INPUTS)] | TokenList | \
        Annotated[list[TokenList], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: None = Field(None, description="Not supported: the vectors have the model's own size "
                                               "(embedding_length in GET /v1/models).")
    user: str | None = Field(None, max_length=256)

    @field_validator("dimensions", mode="before")
    @classmethod
    def _no_dimensions(cls, value):
        if value is not None:
            raise ValueError("dimensions is not supported: the vectors have the model's own size "
                             "(embedding_length in GET /v1/models)")
        return value

    def operation(self) -> EmbedOperation:
        value = self.input
        if isinstance(value, list) and value and isinstance(value[0], int):
            value = [value]  # one input given as token ids
        fields: dict = {"operation": "embed", "model": self.model, "input": value}
        if self.user:
            fields["metadata"] = {"user": self.user}
        try:
            return EmbedOperation.model_validate(fields)
        except ValidationError as exc:
            raise _invalid(exc) from None


def _infer(**fields) -> InferOperation:
    try:
        return InferOperation.model_validate({"operation": "infer", **fields})
    except ValidationError as exc:
        raise _invalid(exc) from None


_PARAMS = {"json_schema": "response_format"}  # the operation's field -> the OpenAI request's


def refused(exc: ValidationError, params: dict[str, str], whole: str | None) -> errors.OpenAIError:
    """The contract refused the operation a request became: OpenAI's 400 naming the request's field (``params``
    maps the operation's fields to the request's; ``whole`` is the param of an error about no one field)."""
    err = exc.errors(include_input=False, include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    param = params.get(loc[0], loc[0]) if loc else whole
    return errors.invalid(param, f"{'.'.join(loc) or 'body'}: {err['msg']}")


def _invalid(exc: ValidationError) -> errors.OpenAIError:
    return refused(exc, _PARAMS, "body")


def parse(model_cls, raw: bytes):
    """The request body as ``model_cls``, or OpenAI's 400 naming the first field it gets wrong."""
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        raise errors.invalid(None, "request body is not valid JSON", "invalid_json") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise errors.invalid(None, "request body is nested too deeply", "invalid_json") from None
    if not isinstance(body, dict):
        raise errors.invalid(None, "request body must be a JSON object", "invalid_request")
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"])
        raise errors.invalid(param, f"{param}: {err['msg']}") from None
