"""What each slot's KV cache holds, and where a new prompt saves the most prefill.

llama.cpp keeps a sequence's keys and values per slot; a new job placed in a
slot that already holds a prefix of its prompt (a shared system prompt, a
conversation that grew by a turn) skips that prefix. ``place`` picks the free
slot with the longest common prefix, or copies a busy slot's longer prefix
into the coldest free one (``Backend.share``), and trims the rest.
"""
from __future__ import annotations

import time

from worker.backends.base import Backend


class PrefixCache:
    def __init__(self, backend: Backend, slots: int):
        self.backend = backend
        self.cached: list[list[int]] = [[] for _ in range(slots)]  # tokens whose keys/values each slot holds
        self.used_at = [0.0] * slots

    def place(self, prompt: list[int], free: list[int]) -> tuple[int, int]:
        """The slot (one of ``free``) to decode ``prompt`` in, and how many of its tokens are already there."""
        limit = len(prompt) - 1  # at least one token is evaluated, for the logits
        # Ties go to the slot used last: idle slots' caches stay in the unified KV cache, and every
        # decode attends over all occupied cells, so spreading one client over every slot slows it.
        best = max(free, key=lambda s: (_common(self.cached[s], prompt, limit), self.used_at[s]))
        keep = _common(self.cached[best], prompt, limit)
        slot = best
        if self.backend.can_share_prefix:
            donor = max(range(len(self.cached)), key=lambda s: _common(self.cached[s], prompt, limit))
            shared = _common(self.cached[donor], prompt, limit)
            if donor != best and shared > keep:
                slot = min(free, key=lambda s: self.used_at[s])  # overwrite the coldest cache
                self.backend.share(donor, slot, shared)
                self.cached[slot] = self.cached[donor][:shared]
                keep = shared
        self.backend.forget(slot, keep)
        del self.cached[slot][keep:]
        self.touch(slot)
        return slot, keep

    def extend(self, slot: int, tokens: list[int]) -> None:
        self.cached[slot].extend(tokens)

    def length(self, slot: int) -> int:
        return len(self.cached[slot])

    def touch(self, slot: int) -> None:
        self.used_at[slot] = time.monotonic()

    def forget(self, slot: int) -> None:
        """What the slot holds is unknown (a failed decode) or about to be overwritten (a health probe)."""
        self.backend.forget(slot, 0)
        self.cached[slot].clear()


def _common(cached: list[int], prompt: list[int], limit: int) -> int:
    n = min(len(cached), limit)
    i = 0
    while i < n and cached[i] == prompt[i]:
        i += 1
    return i
