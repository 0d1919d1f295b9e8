"""Turns token bytes into text that is safe to send, one token at a time.

Two things are held back: bytes that may be the start of a multi-byte UTF-8
character (joined with the next token's bytes), and text that could be the
start of a stop string (released once it cannot be, dropped if it is one).
Bytes that can never become valid UTF-8 are replaced with U+FFFD, so every
emitted chunk is valid UTF-8.
"""
from __future__ import annotations

from collections.abc import Sequence


def split_incomplete_utf8(data: bytes) -> tuple[bytes, bytes]:
    """Split ``data`` into (complete, incomplete tail of at most 3 bytes)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return (data[:-back], data[-back:]) if need > back else (data, b"")
    return data, b""


def _held_tail(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class TextAssembler:
    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self._bytes = b""
        self._held = ""
        self.parts: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that can be emitted now."""
        complete, self._bytes = split_incomplete_utf8(self._bytes + data)
        if not complete:
            return ""
        return self._release(self._held + complete.decode("utf-8", errors="replace"))

    def finish(self) -> str:
        """Flush what was held back at the end of generation (nothing after a stop)."""
        if self.stopped:
            return ""
        tail = self._held + self._bytes.decode("utf-8", errors="replace")
        self._held, self._bytes = "", b""
        self.parts.append(tail)
        return tail

    def _release(self, text: str) -> str:
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = text[:cut], ""
        else:
            keep = _held_tail(text, self.stops)
            out, self._held = text[: len(text) - keep], text[len(text) - keep:]
        self.parts.append(out)
        return out
