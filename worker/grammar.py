"""What an ``infer`` job's output must match, as GBNF for llama.cpp's grammar sampler.

A ``grammar`` is taken as written; a ``json_schema`` is converted with the
converter llama-cpp-python ships (``llama_cpp.llama_grammar``, a port of
llama.cpp's json-schema-to-grammar). The contract bounds the schema's size and
counts (``queue_schema.operations``) because the converter writes every
repetition out. OpenAI's ``json_object`` mode arrives as the schema
``{"type": "object"}``: any JSON object.

The converter's string characters (``char``, and ``dot`` for a pattern's ``.``)
allow control characters, and ``dot`` a quote or a backslash, all of which
end or break a JSON string; they are narrowed to what JSON allows unescaped,
as llama.cpp's own converter now does for ``char``.
"""
from __future__ import annotations

import json
import math

from queue_schema.operations import InferOperation

MAX_GBNF_CHARS = 1 << 20
MAX_RANGE = 1000  # integer ranges written out as enums up to this many values
FORCED_CALLS = 16  # calls one forced answer may hold: each more one is written out in the grammar
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F]'
_SAFE_RULES = {
    "char": _JSON_CHAR + r' | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])',
    "dot": _JSON_CHAR,
}


def of(op: InferOperation) -> str | None:
    """The job's GBNF, or None; ValueError for a schema the converter cannot take."""
    if op.grammar is not None:
        return op.grammar
    if op.must_call:
        return from_json_schema(call_schema(op))
    if op.json_schema is None:
        return None
    return from_json_schema(op.json_schema)


def call_schema(op: InferOperation) -> dict:
    """What a forced call is (the ``json`` call syntax): ``{"name": ..., "arguments": {...}}`` for one of the
    allowed functions, its arguments matching that function's parameters; with ``required`` and
    ``parallel_tool_calls``, a list of one or more of them. ``name`` comes first, so a stream can name the
    function before its arguments are written."""
    forced = op.forced_tool
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "arguments": t.function.parameters or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False}
             for t in op.tools if forced in (None, t.function.name)]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if forced is None and op.parallel_tool_calls:
        return {"type": "array", "items": one, "minItems": 1, "maxItems": FORCED_CALLS}
    return one


def from_json_schema(schema: dict) -> str:
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError:
        raise ValueError("structured output needs llama-cpp-python on the worker") from None
    try:
        gbnf = json_schema_to_gbnf(json.dumps(_ranges_as_enums(schema)))
    except RecursionError:
        raise ValueError("json_schema: nested too deeply to convert") from None
    except Exception as exc:  # the converter asserts, raises KeyError/ValueError/TypeError on what it cannot do
        raise ValueError(f"json_schema cannot be turned into a grammar: {exc.__class__.__name__}: {exc}") from None
    gbnf = "\n".join(_safe(line) for line in gbnf.splitlines())
    if len(gbnf) > MAX_GBNF_CHARS:
        raise ValueError(f"json_schema makes a grammar of {len(gbnf)} characters, more than {MAX_GBNF_CHARS}")
    return gbnf


def _ranges_as_enums(node):
    """Integer bounds as the values they allow, when there are at most MAX_RANGE of them: the converter
    ignores ``minimum``/``maximum`` (a tool's ``"days": {"minimum": 1, "maximum": 7}`` would get any integer),
    while it writes an enum out exactly. Wider ranges stay as the converter takes them (unbounded)."""
    if isinstance(node, list):
        return [_ranges_as_enums(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _ranges_as_enums(v) for k, v in node.items()}
    if out.get("type") == "integer" and "enum" not in out:
        low, high = _bound(out, "minimum", "exclusiveMinimum", 1), _bound(out, "maximum", "exclusiveMaximum", -1)
        if low is not None and high is not None and 0 <= high - low < MAX_RANGE:
            return {"enum": list(range(low, high + 1))}
    return out


def _bound(node: dict, inclusive: str, exclusive: str, step: int) -> int | None:
    values = []
    if isinstance(node.get(inclusive), (int, float)) and not isinstance(node[inclusive], bool):
        values.append(math.ceil(node[inclusive]) if step > 0 else math.floor(node[inclusive]))
    if isinstance(node.get(exclusive), (int, float)) and not isinstance(node[exclusive], bool):
        edge = node[exclusive]
        values.append(math.floor(edge) + 1 if step > 0 else math.ceil(edge) - 1)
    if not values:
        return None
    return max(values) if step > 0 else min(values)


def _safe(line: str) -> str:
    name, sep, _ = line.partition(" ::= ")
    return f"{name} ::= {_SAFE_RULES[name]}" if sep and name in _SAFE_RULES else line
