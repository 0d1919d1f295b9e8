"""Log-probabilities of a sampled token, from the logits row it was sampled from.

Computed with numpy only for sequences that asked (a log-softmax over the
vocabulary costs about a millisecond on 150k tokens). They are the model's
own distribution: before temperature, penalties, logit bias or a grammar, as
OpenAI reports them.
"""
from __future__ import annotations

import numpy as np

from queue_schema.events import TopLogprob
from worker.backends.base import Backend


def _entry(backend: Backend, token: int, logprob: float) -> TopLogprob:
    piece = backend.token_bytes(token)
    return TopLogprob.model_construct(token=piece.decode("utf-8", errors="replace"), logprob=round(logprob, 6),
                                      bytes=list(piece))


def fields(backend: Backend, row: int, token: int, top: int) -> dict:
    """The token event's logprob fields: ``token``, ``logprob``, ``bytes`` and (top > 0) ``top_logprobs``."""
    logits = np.asarray(backend.logits(row), dtype=np.float64)
    peak = logits.max()
    logz = peak + np.log(np.exp(logits - peak).sum())
    chosen = _entry(backend, token, float(logits[token] - logz))
    out = {"token": chosen.token, "logprob": chosen.logprob, "bytes": chosen.bytes}
    if top > 0:
        k = min(top, logits.shape[0])
        ids = np.argpartition(-logits, k - 1)[:k]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        out["top_logprobs"] = [_entry(backend, int(t), float(logits[t] - logz)) for t in ids]
    return out
