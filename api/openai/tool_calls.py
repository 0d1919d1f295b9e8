"""Tool calls read out of a model's text, whole (``parse``) or as it streams (``ToolStream``).

When a request offers ``tools``, a worker's text may hold the model's own tool-call syntax, in the format
(one of ``FORMATS``) that the job's log names:

- ``hermes``: optional content, then ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` once or
  more, only whitespace between and after; the last ``</tool_call>`` may be missing at the text's very end.
- ``llama3``: optional ``<|python_tag|>``, then ``{"name": ..., "parameters": {...}}`` objects apart by ``;``
  and/or whitespace (a last ``;`` is fine), and nothing else.
- ``mistral``: optional content, then ``[TOOL_CALLS]`` and a JSON array of call objects (or one object).
- ``json`` (inferq's grammar-forced output): one call object or a JSON array of them, nothing else.

In every format a call object holds ``name``, one of the offered names, and exactly one of ``arguments`` /
``parameters``: a JSON object, or a JSON string that holds one. ``id`` and ``"type": "function"`` may ride
along; any other key spoils the call. ``Call.arguments`` is the model's own JSON text (for a string, its
decoded inner text), stripped, never re-serialized, so whole and streamed answers agree byte for byte.
Content is the text before the first call less its trailing whitespace, None if nothing is left. Anything
else (an unknown name, bad JSON or NaN, text after a call, an empty array, a cut-short call) turns the WHOLE
output into content, unchanged, with no calls: a client never gets a broken call.

``ToolStream(fmt, names)`` does the same as the text comes: ``feed(piece)`` and then ``close()`` answer lists
of ``ContentDelta(text)``, ``CallStart(index, name)`` and ``ArgsDelta(index, text)``; ``result`` (after close)
is ``parse()`` of all the text. Content goes out as soon as it cannot begin a call: only trailing whitespace
and a partial marker (``<tool_c``, ``[TOOL_``) are held back, or, for llama3 and json, the output while it may
still be calls. From a possible call on, everything is held; the moment it cannot be valid calls, it and
all after it go out as content. Since one bad call spoils all, calls go out only at ``close()``: CallStart,
then ArgsDelta cut where the text came in ``feed()`` pieces (one piece for string-encoded arguments). So a
stream's content and calls are always ``parse()``'s. ``call_id`` names a call after its job and index, the
same each time an answer is rebuilt from the log; ``call_names`` lists the names of OpenAI chat tools::

    parse(text, fmt, names) -> Parsed(content: str | None, calls: tuple[Call(name, arguments), ...])
    ToolStream(fmt, names): .feed(text) -> [event], .close() -> [event], .result -> Parsed
    call_id(job_id, index) -> "call_" + 24 hex digits;  call_names(tools) -> [name, ...]
"""
from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Collection
from dataclasses import dataclass

FORMATS = ("hermes", "llama3", "mistral", "json")
MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}  # where content ends and calls begin
ARG_KEYS = {"arguments", "parameters"}
KEYS = {"name", "type", "id"} | ARG_KEYS

_WS = re.compile(r"\s*")
_JSON_WS = re.compile(r"[ \t\n\r]*")
_STRUCTURE = re.compile(r'["{}[\]]')
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.S)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON a client can read")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text of an object, as the model wrote it


@dataclass(frozen=True)
class Parsed:
    content: str | None
    calls: tuple[Call, ...] = ()


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    name: str


@dataclass(frozen=True)
class ArgsDelta:
    index: int
    text: str


def call_id(job_id: str, index: int) -> str:
    return "call_" + hashlib.sha256(f"{job_id}\0{index}".encode()).hexdigest()[:24]


def call_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools or () if t.get("type") == "function" and t.get("function")]


class _Invalid(Exception):
    """The text is not valid calls, nor can any continuation of it be: it is content."""


class _Incomplete(Exception):
    """The text ran out where more could still make valid calls (only asked of a stream's text so far)."""


class _Reader:
    """A cursor over the text; ``final`` says whether it is all there is."""

    def __init__(self, text: str, names: Collection[str], final: bool, memo: dict | None = None):
        self.text, self.names, self.final, self.pos = text, names, final, 0
        self.memo = {} if memo is None else memo  # value start -> (scanned up to, depth, (calls, end) once whole)

    def out_of_text(self):
        raise _Invalid() if self.final else _Incomplete()

    def end(self) -> bool:
        self.pos = _WS.match(self.text, self.pos).end()
        return self.pos == len(self.text)

    def literal(self, word: str) -> bool:
        if self.text.startswith(word, self.pos):
            self.pos += len(word)
            return True
        if len(self.text) - self.pos < len(word) and word.startswith(self.text[self.pos:]):
            self.out_of_text()  # a word cut short: final, it is just not there
        return False

    def calls(self, arrays: bool) -> list[tuple[str, str, tuple[int, int] | None]]:
        """One call object (or, with ``arrays``, a non-empty array of them) at the cursor."""
        if self.end():
            self.out_of_text()
        text, start = self.text, self.pos
        if text[start] != "{" and not (arrays and text[start] == "["):
            raise _Invalid()
        # A stream asks again after every piece: what it learnt of a value so far is kept, so that a long
        # one costs its length once, not once a piece. Only strings and brackets tell where a value ends.
        pos, depth, in_string, done = self.memo.get(start, (start, 0, False, None))
        while done is None:
            if in_string:
                pos = _STRING_BODY.match(text, pos).end()
                if pos == len(text) or text[pos] != '"':  # the text ends in the string (or in an escape)
                    break
                pos, in_string = pos + 1, False
            m = _STRUCTURE.search(text, pos)
            if m is None:
                pos = len(text)
                break
            pos, c = m.end(), m.group()
            if c == '"':
                in_string = True
            else:
                depth += 1 if c in "[{" else -1
                if depth == 0:
                    done = self.walk(text[:pos], start)  # the walk cannot run past the value, whatever it holds
        self.memo[start] = pos, depth, in_string, done
        if done is None:
            self.out_of_text()
        self.pos = done[1]
        return done[0]

    def walk(self, text: str, start: int) -> tuple[list, int]:
        """The calls of the JSON value that ``text`` ends with, from ``start``, and where it ends."""
        try:
            if text[start] == "{":
                members, i = _object(text, start)
                return [self.call(members)], i
            found, i = [], start  # an array: at "[" or ",", the next call follows
            while True:
                members, i = _object(text, _skip(text, i + 1))
                found.append(self.call(members))
                i = _skip(text, i)
                if text[i] == "]":
                    return found, i + 1
                if text[i] != ",":
                    raise _Invalid()
        except (ValueError, IndexError):
            raise _Invalid() from None

    def call(self, members: dict[str, tuple[object, int, int]]) -> tuple[str, str, tuple[int, int] | None]:
        keys = set(members)
        arg_keys = keys & ARG_KEYS
        if not keys <= KEYS or "name" not in keys or len(arg_keys) != 1:
            raise _Invalid()
        name, value = members["name"][0], members[arg_keys.pop()]
        if not isinstance(name, str) or name not in self.names or members.get("type", ("function",))[0] != "function":
            raise _Invalid()
        args, a, b = value
        if isinstance(args, str):  # a model that writes its arguments as one JSON string: their inner text
            inner = args.strip()
            if not isinstance(_DECODER.decode(inner), dict):
                raise _Invalid()
            return name, inner, None
        if not isinstance(args, dict):
            raise _Invalid()
        return name, self.text[a:b], (a, b)


def _skip(text: str, i: int) -> int:
    return _JSON_WS.match(text, i).end()


def _object(text: str, i: int) -> tuple[dict[str, tuple[object, int, int]], int]:
    """The members of the JSON object at ``text[i]``, each with where its value's text lies, and its end."""
    if text[i] != "{":
        raise _Invalid()
    members, i = {}, _skip(text, i + 1)
    if text[i] == "}":
        return members, i + 1
    while True:
        if text[i] != '"':
            raise _Invalid()
        key, i = _DECODER.raw_decode(text, i)
        i = _skip(text, i)
        if text[i] != ":":
            raise _Invalid()
        start = _skip(text, i + 1)
        value, i = _DECODER.raw_decode(text, start)
        members[key] = (value, start, i)
        i = _skip(text, i)
        if text[i] == "}":
            return members, i + 1
        if text[i] != ",":
            raise _Invalid()
        i = _skip(text, i + 1)


def _read(text: str, fmt: str, names: Collection[str], final: bool, memo: dict | None = None):
    """Where the content ends and the calls, each as (name, arguments, its span in ``text`` or None)."""
    r = _Reader(text, names, final, memo)
    marker = MARKERS.get(fmt)
    if marker:
        r.pos = text.find(marker)
        if r.pos < 0:
            raise _Invalid()
    content_end, calls = max(r.pos, 0), []
    if fmt == "hermes":
        while r.literal(marker):
            calls += r.calls(arrays=False)
            if r.end():
                break  # out of text right after the JSON: the last </tool_call> may go unwritten
            if not r.literal("</tool_call>"):
                raise _Invalid()
            if r.end():
                break
        else:
            raise _Invalid()  # text after a call
    elif fmt == "llama3":
        r.end()
        r.literal("<|python_tag|>")
        calls += r.calls(arrays=False)
        while not r.end():
            if r.literal(";") and r.end():
                break
            calls += r.calls(arrays=False)
    else:
        if marker:
            r.literal(marker)
        calls += r.calls(arrays=True)
        if not r.end():
            raise _Invalid()
    return content_end, calls


def _parse(text: str, fmt: str, names: Collection[str], memo: dict | None = None):
    if fmt not in FORMATS:
        raise ValueError(f"unknown tool-call format {fmt!r}")
    try:
        end, calls = _read(text, fmt, names, True, memo)
    except _Invalid:
        return Parsed(text), []
    return Parsed(text[:end].rstrip() or None, tuple(Call(n, a) for n, a, _ in calls)), [s for _, _, s in calls]


def parse(text: str, fmt: str, names: Collection[str]) -> Parsed:
    """The content and calls of a job's whole text."""
    return _parse(text, fmt, names)[0]


class ToolStream:
    """``parse`` as the text comes: fed the job's text pieces, it says what may go to the client now."""

    def __init__(self, fmt: str, names: Collection[str]):
        if fmt not in FORMATS:
            raise ValueError(f"unknown tool-call format {fmt!r}")
        self.fmt, self.names, self.marker = fmt, names, MARKERS.get(fmt)
        self.text, self.sent, self.ends = "", 0, []  # all text; how much went out as content; where pieces end
        self.memo: dict = {}
        self.mode = "scan" if self.marker else "held"  # then "held" (maybe calls), "plain" (content), "closed"
        self._result: Parsed | None = None

    def feed(self, text: str) -> list[ContentDelta | CallStart | ArgsDelta]:
        if self.mode == "closed":
            raise RuntimeError("fed after close()")
        self.text += text
        self.ends.append(len(self.text))
        if self.mode == "scan":
            found = self.text.find(self.marker, self.sent)
            if found < 0:  # keep back a marker's possible start, and whitespace that may precede a call
                held = next((k for k in range(min(len(self.marker) - 1, len(self.text) - self.sent), 0, -1)
                             if self.text.endswith(self.marker[:k])), 0)
                return self._content(self.sent + len(self.text[self.sent:len(self.text) - held].rstrip()))
            out = self._content(self.sent + len(self.text[self.sent:found].rstrip()))
            self.mode = "held"
            return out + self.feed_held()
        if self.mode == "held":
            return self.feed_held()
        return self._content(len(self.text))

    def feed_held(self) -> list[ContentDelta]:
        try:
            _read(self.text, self.fmt, self.names, False, self.memo)
        except _Incomplete:
            pass
        except _Invalid:  # no continuation makes this calls: all of it is content, from here on too
            self.mode = "plain"
            return self._content(len(self.text))
        return []

    def close(self) -> list[ContentDelta | CallStart | ArgsDelta]:
        """At the job's end: what was held back, as content or as the calls."""
        if self.mode == "closed":
            return []
        self.mode = "closed"
        self._result, spans = _parse(self.text, self.fmt, self.names, self.memo)
        if not self._result.calls:
            return self._content(len(self.text))
        out: list = []
        for index, (call, span) in enumerate(zip(self._result.calls, spans)):
            out.append(CallStart(index, call.name))
            if span is None:
                out.append(ArgsDelta(index, call.arguments))
                continue
            a, b = span
            cuts = self.ends[bisect.bisect_right(self.ends, a):bisect.bisect_left(self.ends, b)]
            out += [ArgsDelta(index, self.text[i:j]) for i, j in zip([a, *cuts], [*cuts, b])]
        return out

    @property
    def result(self) -> Parsed:
        """After ``close()``: ``parse()`` of all the text fed."""
        if self._result is None:
            raise RuntimeError("result before close()")
        return self._result

    def _content(self, upto: int) -> list[ContentDelta]:
        piece, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return [ContentDelta(piece)] if piece else []
