"""The small protocol every backend implements, and the decode loop they share.

A backend only has to evaluate tokens and expose the last logits; sampling,
cancellation and prefix reuse live here so both backends behave the same.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from queue_schema.errors import ErrorCode, InferqError


class ModelLoadError(InferqError):
    """The model file cannot be served: missing, not GGUF, unsupported."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.MODEL_NOT_FOUND, message)


@dataclass(frozen=True)
class LoadOptions:
    threads: int = 0  # 0: every core but one
    gpu_layers: int = 0
    ctx_size: int = 0  # 0: the model's own
    batch_size: int = 256

    @property
    def resolved_threads(self) -> int:
        # One core is left to the worker's own threads (publisher, heartbeat):
        # ggml's threads spin at barriers, and a third runnable thread on two
        # cores cut decoding to a twentieth in our measurements.
        return self.threads if self.threads > 0 else max(1, (os.cpu_count() or 2) - 1)


class Backend:
    """Base class: subclasses implement ``_eval``, ``_logits``, ``tokenize`` and ``token_bytes``."""

    name = "base"

    def __init__(self, path: str, options: LoadOptions):
        self.path = path
        self.options = options
        self.context_length = 0
        self.eos_token_id = -1
        self.info = None  # GGUFInfo, set by load_backend
        self.reason = ""  # why load_backend chose this backend
        self._context: list[int] = []  # tokens whose keys/values are in the cache

    # --- what each backend provides -------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        raise NotImplementedError

    def _eval(self, tokens: Sequence[int], n_past: int) -> None:
        raise NotImplementedError

    def _logits(self) -> np.ndarray:
        raise NotImplementedError

    gpu_index: int | None = None  # set by the runtime for a worker pinned to a GPU

    def vram_bytes(self) -> int:
        from worker import gpu

        return gpu.process_vram_bytes(self.gpu_index)

    def health(self) -> bool:
        """Can the model still decode? Evaluates one token and checks the logits."""
        try:
            self._context.clear()  # the probe overwrites the cache's first slot
            self._eval([self.eos_token_id], 0)
            return bool(np.isfinite(self._logits()).all())
        except Exception:
            return False

    def close(self) -> None:
        pass

    # --- shared ---------------------------------------------------------------------
    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(t) for t in tokens)

    def is_eos(self, token: int) -> bool:
        return token == self.eos_token_id

    def evaluate_prompt(self, tokens: Sequence[int], should_stop: Callable[[], bool] = lambda: False) -> int:
        """Evaluate a prompt, reusing the cached prefix it shares with the last one.

        Returns how many prompt tokens were evaluated. Checks ``should_stop``
        between batches because one C call cannot be interrupted.
        """
        keep = 0
        limit = min(len(tokens) - 1, len(self._context))  # re-evaluate at least one token for logits
        while keep < limit and tokens[keep] == self._context[keep]:
            keep += 1
        del self._context[keep:]
        batch = max(1, self.options.batch_size)
        for start in range(keep, len(tokens), batch):
            if should_stop():
                break
            chunk = list(tokens[start:start + batch])
            self._eval(chunk, len(self._context))
            self._context.extend(chunk)
        return len(tokens) - keep

    def generate(self, prompt: Sequence[int], sample: Callable[[np.ndarray, Sequence[int]], int],
                 should_stop: Callable[[], bool] = lambda: False) -> Iterator[int]:
        """Yield generated token ids until EOS, the context is full, or the caller stops."""
        self.evaluate_prompt(prompt, should_stop)
        while not should_stop() and len(self._context) < self.context_length:
            token = sample(self._logits(), self._context)
            if self.is_eos(token):
                return
            yield token
            self._eval([token], len(self._context))
            self._context.append(token)
