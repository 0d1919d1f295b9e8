"""The token loop: sample, assemble text, emit token events, stop on time.

It checks cancellation and the deadline between tokens, because a backend's
C call cannot be interrupted; a token takes milliseconds, so a cancel lands
well inside 100 ms.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from queue_schema.operations import InferOperation
from worker.backends.base import Backend
from worker.sampling import Sampler
from worker.text_assembler import TextAssembler


@dataclass
class Generation:
    text: str
    tokens_out: int
    stop_reason: str  # max_tokens | eos | stop_sequence | cancelled | timeout
    decode_time_ms: int
    first_token_ms: int | None
    tokens_per_sec: float


def generate(backend: Backend, prompt: Sequence[int], op: InferOperation,
             emit_token: Callable[[str, int], None], cancelled: Callable[[], bool],
             deadline: float) -> Generation:
    """Decode up to ``op.max_tokens`` tokens after ``prompt``, emitting text as it becomes safe."""
    sampler = Sampler(op.temperature, op.top_k, op.top_p, op.repetition_penalty, op.seed)
    assembler = TextAssembler(op.stop)
    timed_out = False

    def should_stop() -> bool:
        nonlocal timed_out
        if time.monotonic() > deadline:
            timed_out = True
        return timed_out or cancelled()

    start = time.perf_counter()
    first = last = None
    count = 0
    reason = "eos"
    for token in backend.generate(prompt, sampler, should_stop):
        last = time.perf_counter()
        first = first or last
        chunk = assembler.push(backend.token_bytes(token))
        if chunk:
            emit_token(chunk, count)
        count += 1
        if assembler.stopped:
            reason = "stop_sequence"
            break
        if count >= op.max_tokens:
            reason = "max_tokens"
            break
    else:
        if timed_out:
            reason = "timeout"
        elif cancelled():
            reason = "cancelled"
        elif len(prompt) + count >= backend.context_length:
            reason = "max_tokens"
    tail = assembler.finish()
    if tail:
        emit_token(tail, max(count - 1, 0))
    elapsed = time.perf_counter() - start
    if count > 1 and last > first:
        rate = (count - 1) / (last - first)
    else:
        rate = count / elapsed if elapsed > 0 else 0.0
    return Generation(assembler.text, count, reason, int(elapsed * 1000),
                      None if first is None else int((first - start) * 1000), rate)
