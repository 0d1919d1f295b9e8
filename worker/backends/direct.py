"""One sequence decoded straight on a backend, without the scheduler: the benchmarks' baseline (the engine
decoding directly), and what tests hold backends to. Not the worker's token loop: that is worker.scheduler."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from worker.backends.base import Backend, Chunk, SamplingParams


class DirectDecoder:
    """Decodes in one slot, reusing what a prompt shares with the previous call's."""

    def __init__(self, backend: Backend, slot: int = 0):
        self.backend, self.slot = backend, slot
        self._cached: list[int] = []  # what the slot holds

    def reset(self) -> None:
        """Forget what the slot holds (something else used it: a health probe)."""
        self._cached.clear()

    def generate(self, prompt: Sequence[int], params: SamplingParams,
                 should_stop: Callable[[], bool] = lambda: False) -> Iterator[int]:
        backend, slot = self.backend, self.slot
        keep = 0
        limit = min(len(prompt) - 1, len(self._cached))
        while keep < limit and prompt[keep] == self._cached[keep]:
            keep += 1
        backend.forget(slot, keep)
        del self._cached[keep:]
        sampler = backend.sampler(params, prompt)
        try:
            batch = max(1, backend.options.batch_size)
            row = None
            for start in range(keep, len(prompt), batch):
                if should_stop():
                    return
                part = list(prompt[start:start + batch])
                row = backend.decode([Chunk(slot, part, start, start + batch >= len(prompt))])[0]
                self._cached.extend(part)
            while not should_stop() and len(self._cached) < backend.context_length:
                token = sampler.sample(row)
                if backend.is_eog(token):
                    return
                yield token
                row = backend.decode([Chunk(slot, [token], len(self._cached), True)])[0]
                self._cached.append(token)
        finally:
            sampler.close()
