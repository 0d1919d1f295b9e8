"""llama-cpp-python backend: today's GGUF architectures, tokenizers and quantizations.

``Llama`` loads the model and keeps the KV cache's bookkeeping; logits and
token pieces come from the low-level functions, because in 0.3.x
``Llama.eval`` no longer keeps logits and ``token_to_piece`` truncates pieces
to 32 bytes. Sampling stays ours (see ``worker.sampling``), so both backends
run the same token loop.
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from worker.backends.base import Backend, LoadOptions, ModelLoadError


class LlamaCppBackend(Backend):
    name = "llama-cpp"

    def __init__(self, path: str, options: LoadOptions):
        super().__init__(path, options)
        try:
            import llama_cpp
        except ImportError:
            raise ModelLoadError("llama-cpp-python is not installed: pip install 'inferq[llama]'") from None
        self._lib = llama_cpp
        threads = options.resolved_threads
        try:
            # Threads always explicit: llama-cpp-python's default is cpu_count() // 2.
            self._llm = llama_cpp.Llama(model_path=path, n_ctx=options.ctx_size, n_batch=options.batch_size,
                                        n_threads=threads, n_threads_batch=threads,
                                        n_gpu_layers=options.gpu_layers, logits_all=False, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama-cpp could not load {path}: {exc}") from None
        self._vocab = self._llm._model.vocab
        self.context_length = self._llm.n_ctx()
        self.eos_token_id = self._llm.token_eos()
        self.vocab_size = self._llm.n_vocab()
        self._piece_cache: dict[int, bytes] = {}
        self._buf = ctypes.create_string_buffer(256)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def token_bytes(self, token: int) -> bytes:
        piece = self._piece_cache.get(token)
        if piece is None:
            n = self._lib.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, False)
            if n < 0:  # the piece needs -n bytes
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
                piece = buf.raw[:n]
            else:
                piece = self._buf.raw[:n]
            self._piece_cache[token] = piece
        return piece

    def is_eos(self, token: int) -> bool:
        # End-of-generation covers EOS and the end-of-turn tokens of chat models.
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def _eval(self, tokens: Sequence[int], n_past: int) -> None:
        self._llm.n_tokens = n_past  # Llama.eval drops the cache from n_tokens on
        self._llm.eval(list(tokens))

    def _logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self._llm._ctx.get_logits(), shape=(self.vocab_size,))

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.close()
