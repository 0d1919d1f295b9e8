"""Embed jobs on a worker: the inputs' vectors, a batch per scheduler step.

The job layer (``worker.jobs``) checks and tokenizes the inputs on the intake
thread; the scheduler runs an ``EmbedTask`` on the engine thread, one batch
per step (the inputs that fit the step's token budget, the one the scheduler
gives prefill chunks, and at least one input; at most what the backend's
embedding context takes in one decode), so the streams of running
generations keep flowing. Each input's vector is L2-normalized, as OpenAI's
are, and becomes its own ``embedding`` event (base64 of little-endian
float32): one event per input keeps every event small, and the whole job is
bounded by ``MAX_FLOATS``.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np

from worker.backends.base import Backend
from worker.scheduler import Task

# Floats one job may return (its inputs x the model's dimensions): about 11 MB of events in the log.
MAX_FLOATS = 1 << 21


def encode(vector: np.ndarray) -> str:
    """L2-normalized, as little-endian float32, base64 (what OpenAI's encoding_format=base64 gives)."""
    v = np.asarray(vector, dtype=np.float64)
    norm = np.linalg.norm(v)
    if norm > 0:
        v = v / norm
    return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")


@dataclass(frozen=True)
class EmbeddingOut:
    """One input's vector, as a step returns it."""

    item: "EmbedTask"
    index: int
    embedding: str  # encode()d
    dims: int
    tokens: int


@dataclass(eq=False)
class EmbedTask(Task):
    job_id: str
    inputs: list[list[int]]
    deadline: float
    context: object = None
    cancelled: bool = False
    count: int = 0
    started_at: float = 0.0
    tokens: int = field(init=False, default=0)

    def __post_init__(self):
        self.tokens = sum(map(len, self.inputs))

    def step(self, backend: Backend, budget: int) -> tuple[list[EmbeddingOut], bool]:
        seqs, room = backend.embed_limits()
        batch, used = [], 0
        for ids in self.inputs[self.count:self.count + seqs]:
            if batch and used + len(ids) > min(room, budget):
                break
            batch.append(ids)
            used += len(ids)
        out = []
        for ids, vector in zip(batch, backend.embed(batch)):
            out.append(EmbeddingOut(self, self.count, encode(vector), int(vector.shape[0]), len(ids)))
            self.count += 1
        return out, self.count >= len(self.inputs)
