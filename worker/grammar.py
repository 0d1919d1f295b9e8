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

from queue_schema.operations import InferOperation

MAX_GBNF_CHARS = 1 << 20
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F]'
_SAFE_RULES = {
    "char": _JSON_CHAR + r' | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])',
    "dot": _JSON_CHAR,
}


def of(op: InferOperation) -> str | None:
    """The job's GBNF, or None; ValueError for a schema the converter cannot take."""
    if op.grammar is not None:
        return op.grammar
    if op.json_schema is None:
        return None
    return from_json_schema(op.json_schema)


def from_json_schema(schema: dict) -> str:
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError:
        raise ValueError("structured output needs llama-cpp-python on the worker") from None
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise ValueError("json_schema: nested too deeply to convert") from None
    except Exception as exc:  # the converter asserts, raises KeyError/ValueError/TypeError on what it cannot do
        raise ValueError(f"json_schema cannot be turned into a grammar: {exc.__class__.__name__}: {exc}") from None
    gbnf = "\n".join(_safe(line) for line in gbnf.splitlines())
    if len(gbnf) > MAX_GBNF_CHARS:
        raise ValueError(f"json_schema makes a grammar of {len(gbnf)} characters, more than {MAX_GBNF_CHARS}")
    return gbnf


def _safe(line: str) -> str:
    name, sep, _ = line.partition(" ::= ")
    return f"{name} ::= {_SAFE_RULES[name]}" if sep and name in _SAFE_RULES else line
