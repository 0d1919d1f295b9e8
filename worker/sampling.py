"""Token sampling from logits: logit bias, penalties, temperature, top-k, top-p.

Done here rather than in the backend's C code so that every backend samples
identically, ``temperature=0`` is exactly greedy, and one seeded generator
serves the whole job (ctransformers re-seeds on every call).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REPETITION_WINDOW = 64


class Sampler:
    def __init__(self, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 repetition_penalty: float = 1.1, seed: int = -1, window: int = REPETITION_WINDOW,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: Sequence[tuple[int, float]] = ()):
        self.temperature = temperature
        self.presence, self.frequency = presence_penalty, frequency_penalty
        self.bias = (np.array([t for t, _ in logit_bias], dtype=np.int64),
                     np.array([b for _, b in logit_bias], dtype=np.float32)) if logit_bias else None
        self.top_k = top_k
        self.top_p = top_p
        # <= 0 would divide by zero; treat it like 1.0, "no penalty".
        self.penalty = repetition_penalty if repetition_penalty > 0 else 1.0
        self.window = window
        self.rng = np.random.default_rng(None if seed < 0 else seed)

    def __call__(self, logits: np.ndarray, recent: Sequence[int], generated: Sequence[int] = ()) -> int:
        """``recent``: the repetition penalty's window (prompt tail included); ``generated``: this
        sequence's output so far, for the presence and frequency penalties. In the llama-cpp
        backend's order: bias, repetition, presence/frequency."""
        if self.bias is not None or (self.penalty != 1.0 and recent) or \
                ((self.presence or self.frequency) and len(generated)):
            logits = np.array(logits, dtype=np.float32)  # never modify the backend's buffer
        if self.bias is not None:
            ids, values = self.bias
            keep = ids < logits.shape[0]
            logits[ids[keep]] += values[keep]
        if self.penalty != 1.0 and recent:
            seen = np.unique(np.asarray(recent[-self.window:], dtype=np.int64))
            seen = seen[seen < logits.shape[0]]
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / self.penalty, vals * self.penalty)
        if (self.presence or self.frequency) and len(generated):
            ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
            keep = ids < logits.shape[0]
            logits[ids[keep]] -= counts[keep] * self.frequency + self.presence
        if self.temperature <= 0:
            return int(np.argmax(logits))
        n = logits.shape[0]
        if 0 < self.top_k < n:
            ids = np.argpartition(logits, n - self.top_k)[n - self.top_k:]
        else:
            ids = np.arange(n)
        scaled = logits[ids].astype(np.float64) / self.temperature
        order = np.argsort(-scaled, kind="stable")
        ids, scaled = ids[order], scaled[order]
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p, side="left")) + 1
            ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
        return int(ids[np.searchsorted(np.cumsum(probs), self.rng.random(), side="right").clip(max=len(ids) - 1)])
