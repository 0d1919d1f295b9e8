"""A job's prompt as tokens: a plain prompt, or chat messages through the model's template.

Chat prompts: the template's text is split at the control tokens the model
knows (``<|im_start|>``, ``<|eot_id|>``, ``<start_of_turn>``: each one token),
and the plain runs between them — template text and message content together,
as llama.cpp would see them — are tokenized without parsing specials. So the
tokens are those llama.cpp gives the whole rendered text with
``parse_special``, except that a control token typed inside a message stays
text. The BOS token is added once: not again when the template writes it
(Llama 3 and Gemma templates do), as llama.cpp's own chat path does.

Oversized prompts (issue #20) are refused before they are tokenized in full:
no token covers more than ``longest_piece`` bytes, so a prompt of more bytes
than ``budget x longest_piece`` cannot fit and is refused at once; a shorter
one that still may not fit is tokenized a growing prefix at a time (cut at a
space), and refused as soon as a prefix alone needs more tokens than the
budget. ``llama_tokenize`` cannot stop early by itself: given too small a
buffer it tokenizes everything and only then reports the count.
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence

from jinja2.exceptions import TemplateError

from queue_schema.errors import ErrorCode, InferqError
from worker import chat_template
from worker.backends.base import Backend

# Tokens a prefix cut at a space may have beyond what the same bytes have inside the whole text.
CUT_SLACK = 8
FIRST_PREFIX_BYTES_PER_TOKEN = 4


class PromptTooLong(InferqError):
    """The prompt needs more tokens than the budget; ``tokens`` is a count or a lower bound."""

    def __init__(self, tokens: int, exact: bool):
        super().__init__(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"{'' if exact else 'at least '}{tokens} tokens")
        self.tokens, self.exact = tokens, exact


class PromptBuilder:
    """Builds prompts for one loaded backend (its specials and longest piece, read once)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.longest = max(1, backend.longest_piece)
        specials = {text: token for text, token in backend.special_tokens.items() if text}
        self.specials = specials

    @functools.cached_property
    def _split(self) -> re.Pattern | None:
        # Built at the first chat prompt, not at start: over Gemma 3's 6,250 control tokens it takes 0.2 s.
        if not self.specials:
            return None
        return re.compile("|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))))

    # --- plain prompts -------------------------------------------------------------------
    def from_text(self, text: str, budget: int) -> list[int]:
        """``text`` as the model's tokens (BOS as the model wants it; specials not parsed)."""
        return self._bounded(text, budget, add_bos=True)

    # --- chat ----------------------------------------------------------------------------
    def from_messages(self, messages: Sequence[dict], template: str | None, budget: int,
                      tools: Sequence[dict] | None = None) -> tuple[list[int], str]:
        """The rendered conversation's tokens and its text; TemplateError if the template refuses it.

        Messages and tools are as the contract dumps them; a template that knows no tools gets them written
        into the messages' text (``chat_template.plain_tool_messages``)."""
        b = self.backend
        if chat_template.tool_support(template).native:
            messages = chat_template.template_messages(messages)
            self._no_control_tokens(messages, tools)
        elif tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            messages, tools = chat_template.plain_tool_messages(messages, tools), None
        rendered = chat_template.render_parts(messages, template, b.bos_text, b.eos_text, True, tuple(self.specials),
                                              tools)
        text = rendered.text
        self._check_bytes(len(text.encode("utf-8")), budget)
        runs = self._runs(rendered.parts)
        tokens: list[int] = []
        if b.add_bos and b.bos_token_id >= 0 and not (runs and runs[0] == b.bos_token_id):
            tokens.append(b.bos_token_id)
        for i, run in enumerate(runs):
            if isinstance(run, int):
                tokens.append(run)
            else:
                try:
                    tokens += self._bounded(run, budget - len(tokens), add_bos=False, before=len(tokens))
                except PromptTooLong as exc:  # a count only if nothing comes after
                    raise PromptTooLong(exc.tokens, exc.exact and i == len(runs) - 1) from None
            if len(tokens) > budget:
                raise PromptTooLong(len(tokens), exact=False)
        return tokens, text

    def _no_control_tokens(self, messages: Sequence[dict], tools: Sequence[dict] | None) -> None:
        """A native template writes tool definitions and calls as its own text, where a control token would be
        parsed as one and could forge a turn: refuse them (content is kept apart; these cannot be)."""
        written = [tools or [], [m.get("tool_calls") or [] for m in messages]]
        text = json.dumps(written, ensure_ascii=False)
        typed = next((s for s in self.specials if s in text), None)
        if typed is not None:
            raise TemplateError(f"a tool definition or call holds the control token {typed!r}; remove it")

    def _runs(self, parts) -> list[int | str]:
        """Control tokens (ids) and the plain text between them, adjacent text joined."""
        runs: list[int | str] = []

        def text(s: str) -> None:
            if not s:
                return
            if runs and isinstance(runs[-1], str):
                runs[-1] += s
            else:
                runs.append(s)

        for part, from_template in parts:
            if not from_template or self._split is None:
                text(part)
                continue
            at = 0
            for m in self._split.finditer(part):
                text(part[at:m.start()])
                runs.append(self.specials[m.group(0)])
                at = m.end()
            text(part[at:])
        return runs

    # --- the size guards -----------------------------------------------------------------
    def _check_bytes(self, nbytes: int, budget: int, before: int = 0) -> None:
        if nbytes > max(budget, 0) * self.longest:
            raise PromptTooLong(before + math.ceil(nbytes / self.longest), exact=False)

    def _bounded(self, text: str, budget: int, add_bos: bool, before: int = 0) -> list[int]:
        """Tokenize ``text`` unless it needs more than ``budget`` tokens, found out without tokenizing it all."""
        tokenize = self.backend.tokenize
        data = text.encode("utf-8")
        self._check_bytes(len(data), budget, before)
        size = max(FIRST_PREFIX_BYTES_PER_TOKEN * (budget + 1), 4096)
        while size < len(data):
            cut = data.rfind(b" ", 0, size)
            if cut <= 0:
                cut = size
                while cut > 0 and data[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character
                    cut -= 1
            head = tokenize(data[:cut].decode("utf-8"), add_bos, False)
            if len(head) - CUT_SLACK > budget:
                raise PromptTooLong(before + len(head) - CUT_SLACK, exact=False)
            size *= 4
        tokens = tokenize(text, add_bos, False)
        if len(tokens) > budget:
            raise PromptTooLong(before + len(tokens), exact=True)
        return tokens
