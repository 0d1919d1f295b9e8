"""Operations clients submit, validated with pydantic.

An operation is tagged by the field ``operation``: ``infer`` (generate text)
or ``embed`` (one vector per input). Adding one means adding a model to
``OPERATIONS`` (and a job function name in ``queue_schema.lifecycle.admission``).
"""
from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, Union

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
MAX_GRAMMAR_CHARS = 16384
MAX_SCHEMA_BYTES = 16384
MAX_SCHEMA_DEPTH = 32
# JSON Schema counts (minItems, maxLength...) become repetitions in the grammar, written out one by one.
MAX_SCHEMA_COUNT = 1000
# A raw grammar's repetitions ({m,n}) are written out by llama.cpp's parser too: each copies the element
# before it, so their counts and what they copy are bounded, as the schema's are, and so is nesting.
MAX_GRAMMAR_EXPANSION = 100_000  # grammar symbols the repetitions may write out, in all
MAX_LOGIT_BIAS = 1024
MAX_EMBED_INPUTS = 2048
MAX_EMBED_TOKENS_PER_INPUT = 8192
MAX_EMBED_CHARS = 1_000_000  # all the inputs together
_COUNT_KEYS = frozenset({"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"})
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


MAX_TOOLS = 64
MAX_TOOL_CALLS = 64
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
CALL_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


class FunctionDef(BaseModel):
    """A function the model may call: OpenAI's ``tools[].function``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str = Field(None, max_length=4096)  # type: ignore[assignment]
    parameters: dict[str, Any] = Field(None, description="JSON Schema of the arguments (an object); the "  # type: ignore[assignment]
                                       "grammar of a forced call is built from it.")
    strict: bool = Field(None, description="Accepted; a forced call always matches the schema.")  # type: ignore[assignment]

    @field_validator("parameters")
    @classmethod
    def _parameters_bounds(cls, schema: dict[str, Any]) -> dict[str, Any]:
        return _bounded_schema(schema, "parameters")


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)


class NamedToolChoice(BaseModel):
    """Force a call of this function."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    type: Literal["function"]
    function: FunctionName


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    arguments: str = Field(max_length=MAX_PROMPT_CHARS, description="The arguments as JSON text.")


class ToolCall(BaseModel):
    """A call an assistant message made (sent back with the conversation)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: str = Field(pattern=CALL_ID_PATTERN)
    type: Literal["function"] = "function"
    function: CalledFunction


MESSAGE_SHAPES = [
    {"properties": {"role": {"const": "tool"}}, "required": ["role", "content", "tool_call_id"],
     "not": {"required": ["tool_calls"]}},
    {"properties": {"role": {"const": "assistant"}}, "required": ["role"],
     "anyOf": [{"required": ["content"]}, {"required": ["tool_calls"]}], "not": {"required": ["tool_call_id"]}},
    {"properties": {"role": {"enum": ["system", "user"]}}, "required": ["role", "content"],
     "not": {"anyOf": [{"required": ["tool_calls"]}, {"required": ["tool_call_id"]}]}},
]


class ChatMessage(BaseModel):
    """A turn: ``tool`` turns carry a call's result (``tool_call_id`` names the call), and an ``assistant`` turn
    may hold ``tool_calls`` instead of (or beside) its content."""

    # The document says what _shape enforces.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=lambda schema, _: schema.update(
        oneOf=MESSAGE_SHAPES))

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(None, max_length=MAX_PROMPT_CHARS)  # type: ignore[assignment]
    tool_calls: list[ToolCall] = Field(None, min_length=1, max_length=MAX_TOOL_CALLS)  # type: ignore[assignment]
    tool_call_id: str = Field(None, pattern=CALL_ID_PATTERN)  # type: ignore[assignment]

    @model_validator(mode="after")
    def _shape(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        if self.content is None and self.tool_calls is None:
            raise ValueError("content is required (an assistant message may give tool_calls instead)")
        return self


class InferOperation(BaseModel):
    """Generate text from a prompt (or chat messages) with one model."""

    # The document says what the validators enforce: exactly one of prompt/messages.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
        "not": {"anyOf": [{"required": ["json_schema", "grammar"]}, {"required": ["tools", "json_schema"]},
                          {"required": ["tools", "grammar"]}, {"required": ["tools", "prompt"]}]},
        # tool_choice needs tools (that a named one must be one of them, no schema can say).
        "anyOf": [{"not": {"required": ["tool_choice"]}}, {"required": ["tools"]}]})

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
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted once from every token already "
                                    "generated (OpenAI's; the prompt does not count).")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted per time a token was generated.")
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] = Field(
        default_factory=dict, description="Token id (as a string) -> added to its logit, -100..100; -100 all but "
                                          "bans it, 100 all but forces it.",
        json_schema_extra={"maxProperties": MAX_LOGIT_BIAS, "additionalProperties": False})
    logprobs: int = Field(None, ge=0, le=20, description="Log-probabilities on every token event, with this "
                          "many alternatives (0: the chosen token's only).")  # type: ignore[assignment]
    json_schema: dict[str, Any] = Field(None, description="The output is JSON matching this JSON Schema (at most "
                                        f"{MAX_SCHEMA_BYTES} bytes, counts up to {MAX_SCHEMA_COUNT}).",
                                        json_schema_extra={"maxProperties": 64})  # type: ignore[assignment]
    grammar: str = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS,  # type: ignore[assignment]
                         description="The output matches this GBNF grammar (llama.cpp's; rule 'root').")
    tools: list[Tool] = Field(None, min_length=1, max_length=MAX_TOOLS,  # type: ignore[assignment]
                              description="Functions the model may call (OpenAI's chat tools); with messages.")
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice = Field(  # type: ignore[assignment]
        None, description="auto (the default with tools): the model's own call syntax is read; none: tools are "
                          "not offered; required or a named function: a grammar forces a call.")
    parallel_tool_calls: bool = Field(True, description="A forced call may be several calls.")
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

    # Called when the job ends (api/webhooks.py); the API allows only
    # the hosts in INFERQ_WEBHOOK_ALLOW_HOSTS.
    webhook_url: str = Field(None, min_length=1, max_length=2048,  # type: ignore[assignment]
                             description="POSTed a signed job.finished / job.failed / job.cancelled event.")

    @field_validator("max_tokens", "top_k", "seed", "timeout_s", "ttl_s", "logprobs", mode="before")
    @classmethod
    def _integral_floats(cls, value: Any) -> Any:
        return _integral(value)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_size(cls, bias: dict[str, float]) -> dict[str, float]:
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias holds at most {MAX_LOGIT_BIAS} tokens")
        return bias

    @field_validator("json_schema")
    @classmethod
    def _schema_bounds(cls, schema: dict[str, Any]) -> dict[str, Any]:
        return _bounded_schema(schema, "json_schema")

    @field_validator("tools")
    @classmethod
    def _tools_bounds(cls, tools: list[Tool]) -> list[Tool]:
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError("tools: each function name once")
        # Forced calls become one grammar over all the tools' schemas: bound them together as one schema.
        if sum(len(json.dumps(t.function.parameters or {})) for t in tools) > MAX_SCHEMA_BYTES:
            raise ValueError(f"tools: the parameters schemas hold at most {MAX_SCHEMA_BYTES} bytes of JSON in all")
        return tools

    @field_validator("grammar")
    @classmethod
    def _grammar_bounds(cls, grammar: str) -> str:
        _check_grammar(grammar)
        return grammar

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
        if self.json_schema is not None and self.grammar is not None:
            raise ValueError("give at most one of 'json_schema' or 'grammar'")
        if self.tools is not None:
            if self.messages is None:
                raise ValueError("tools go with messages (a chat), not a prompt")
            if self.json_schema is not None or self.grammar is not None:
                raise ValueError("give tools or a json_schema/grammar, not both")
        return self

    @field_validator("tool_choice")
    @classmethod
    def _choice_of_the_tools(cls, choice, info):
        if "tools" not in info.data:
            return choice  # the tools themselves were refused: that error is the one to see
        tools = info.data["tools"]
        if tools is None:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"names {choice.function.name!r}, which is not one of the tools")
        return choice

    @property
    def calls_tools(self) -> bool:
        """The model is offered the tools (rendered in its prompt) and its output is read for calls."""
        return self.tools is not None and self.tool_choice != "none"

    @property
    def forced_tool(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    @property
    def must_call(self) -> bool:
        """``required`` or a named function: a grammar forces the call (inferq's ``json`` call format)."""
        return self.calls_tools and (self.tool_choice == "required" or self.forced_tool is not None)

    def needs(self) -> list[str]:
        """The worker capabilities this job needs (records.ModelInfo.capabilities), checked at submit."""
        out = []
        if self.json_schema is not None or self.grammar is not None or self.must_call:
            out.append("grammar")
        if self.logprobs is not None:
            out.append("logprobs")
        return out


def _bounded_schema(schema: dict[str, Any], name: str) -> dict[str, Any]:
    try:
        size = len(json.dumps(schema).encode())
    except (ValueError, RecursionError):
        raise ValueError(f"{name} must be plain JSON") from None
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"{name} must serialize to at most {MAX_SCHEMA_BYTES} bytes of JSON")
    _check_schema(schema, 0, name)
    return schema


def _check_schema(node: Any, depth: int, name: str) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"{name} nests more than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _COUNT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and value > MAX_SCHEMA_COUNT:
                raise ValueError(f"{name}: {key} is at most {MAX_SCHEMA_COUNT} here")
            if key == "pattern" and isinstance(value, str):
                for low, high in _QUANTIFIER.findall(value):
                    if int(low) > MAX_SCHEMA_COUNT or (high and int(high) > MAX_SCHEMA_COUNT):
                        raise ValueError(f"{name}: pattern repetitions are at most {MAX_SCHEMA_COUNT}")
            _check_schema(value, depth + 1, name)
    elif isinstance(node, list):
        for value in node:
            _check_schema(value, depth + 1, name)


def _check_grammar(text: str) -> None:
    """Nesting and repetitions of a GBNF text, read as llama.cpp's parser reads them (comments, string
    literals and character classes skipped); what a repetition copies is the element just before it."""
    depth, expansion, i, n = 0, 0, 0, len(text)
    last = 1  # source length of the element before the current position (a group or rule: one reference)
    while i < n:
        c = text[i]
        if c == "#":  # a comment, to the end of the line
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if c in "\"[":
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and text[j] != close:
                j += 2 if text[j] == "\\" else 1
            last, i = j + 1 - i, j + 1
            continue
        if c == "(":
            depth += 1
            if depth > MAX_SCHEMA_DEPTH:
                raise ValueError(f"grammar nests groups more than {MAX_SCHEMA_DEPTH} levels")
        elif c == ")":
            depth -= 1
            last = 1
        elif c == "{":
            match = _QUANTIFIER.match(text, i)
            if match:
                low, high = int(match.group(1)), match.group(2)
                count = max(low, int(high) if high else 0)
                if count > MAX_SCHEMA_COUNT:
                    raise ValueError(f"grammar repetitions are at most {MAX_SCHEMA_COUNT}")
                expansion += count * last
                if expansion > MAX_GRAMMAR_EXPANSION:
                    raise ValueError(f"grammar repetitions write out more than {MAX_GRAMMAR_EXPANSION} symbols")
                i = match.end()
                continue
        elif c.isalnum() or c in "-_":
            j = i
            while j < n and (text[j].isalnum() or text[j] in "-_"):
                j += 1
            last, i = 1, j
            continue
        i += 1


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]],
                     Field(min_length=1, max_length=MAX_EMBED_TOKENS_PER_INPUT)]


class EmbedOperation(BaseModel):
    """One embedding vector per input (L2-normalized), from the model's hidden states."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    operation: Literal["embed"]
    model: str = Field(pattern=MODEL_NAME_PATTERN, description="Name a worker serves.")
    input: Union[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)],
                 Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]],
                           Field(min_length=1, max_length=MAX_EMBED_INPUTS)],
                 Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]] = Field(
        description=f"A text, up to {MAX_EMBED_INPUTS} texts, or as many lists of token ids; at most "
                    f"{MAX_EMBED_CHARS} characters in all.")
    priority: Priority = "normal"
    timeout_s: int = Field(600, ge=1, le=3600, description="Deadline once started.")
    ttl_s: int = Field(None, ge=1, le=7 * 24 * 3600,  # type: ignore[assignment]
                       description="Give up (error TIMEOUT) if the job waited longer than this to start.")
    metadata: dict[str, Any] = InferOperation.model_fields["metadata"]
    webhook_url: str = InferOperation.model_fields["webhook_url"]  # type: ignore[assignment]

    @field_validator("timeout_s", "ttl_s", mode="before")
    @classmethod
    def _integral_floats(cls, value: Any) -> Any:
        return _integral(value)

    _metadata_rules = field_validator("metadata")(InferOperation._metadata_rules.__func__)

    @field_validator("input", mode="before")
    @classmethod
    def _integral_ids(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [[_integral(t) for t in item] if isinstance(item, list) else item for item in value]
        return value

    @field_validator("input")
    @classmethod
    def _total_size(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if sum(len(s) for s in value) > MAX_EMBED_CHARS:
                raise ValueError(f"the inputs hold at most {MAX_EMBED_CHARS} characters in all")
        return value

    @property
    def inputs(self) -> list[str] | list[list[int]]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def needs(self) -> list[str]:
        return ["embeddings"]


Operation = Union[InferOperation, EmbedOperation]
OPERATIONS: dict[str, type[BaseModel]] = {"infer": InferOperation, "embed": EmbedOperation}


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


def parse_operation(body: bytes | str | dict, *, default_operation: str | None = None) -> Operation:
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
