"""The Server-Sent Events wire format: frames written by hand, safe for any text.

An event's data is its JSON on one ``data:`` line. JSON never holds a raw CR
or LF, so the SSE spec's own line breaks cannot appear inside it; U+2028,
U+2029 and U+0085 can, and readers that split lines the way Python's
``str.splitlines`` does (flask-sse among them) cut the JSON there. They are
escaped as ``\\uXXXX``, which decodes to the same string.
"""
from __future__ import annotations

from typing import NamedTuple

KEEPALIVE = ": keep-alive\n\n"
_LINE_BREAKS_JSON_ALLOWS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\u0085": "\\u0085"}


def escape_json(data: str) -> str:
    """``data`` (JSON text) with the line separators JSON allows raw written as escapes."""
    for raw, escaped in _LINE_BREAKS_JSON_ALLOWS.items():
        if raw in data:
            data = data.replace(raw, escaped)
    return data


def frame(data: str, event: str | None = None, id: int | None = None) -> str:
    """One SSE message: ``id``, ``event`` and the JSON ``data`` on one line."""
    head = "" if id is None else f"id: {id}\n"
    if event is not None:
        head += f"event: {event}\n"
    return f"{head}data: {escape_json(data)}\n\n"


def retry(ms: int) -> str:
    return f"retry: {ms}\n\n"


class Frame(NamedTuple):
    """An event as the API relays it: parsed once per process, written to every stream."""

    seq: int | None
    type: str
    data: str  # the event's JSON
    text: str  # its SSE message, ready to write


def relayed(published: bytes) -> Frame:
    """The frame of a message published on a channel (see ``queue_schema.lifecycle.eventlog.published``)."""
    seq, event_type, data = published.decode("utf-8").split(" ", 2)
    seq_n = None if seq == "-" else int(seq)
    return Frame(seq_n, event_type, data, frame(data, event_type, seq_n))


def logged(event, with_id: bool = True) -> Frame:
    """The frame of an event read from a log; the narration feed's frames carry no SSE id."""
    seq = event.seq if with_id else None
    data = event.model_dump_json(exclude_none=True)
    return Frame(seq, event.type, data, frame(data, event.type, seq))
