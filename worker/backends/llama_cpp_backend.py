"""llama.cpp through llama-cpp-python's C API: batched decoding of many sequences at once.

One context holds ``parallel`` sequences in a unified KV cache (``kv_unified``),
so a prefix two sequences share can be copied between them instead of being
evaluated twice. ``decode`` puts every sequence's next token, and chunks of
prompts, in one ``llama_decode``; sampling is llama.cpp's own sampler chain
per sequence, in C, so the Python cost per token does not grow with the
vocabulary.

The high-level ``Llama`` class is not used: it owns one sequence. The C
functions' ctypes signatures follow the llama.cpp that llama-cpp-python
vendors (``setup.cfg`` pins the range we test against).
"""
from __future__ import annotations

import ctypes
import os
import logging
from collections.abc import Sequence

import numpy as np

from worker.backends.base import Backend, Chunk, LoadOptions, ModelLoadError, SamplingParams, TokenSampler

log = logging.getLogger(__name__)
REPETITION_WINDOW = 64  # the numpy sampler's window: both backends penalize alike
_GGML_LOG_LEVEL_ERROR = 4
_log_callback = None  # kept alive: llama.cpp calls it from C
_last_error = [""]


def _quiet(llama_cpp) -> None:
    """llama.cpp logs every tensor it loads to stderr; keep its errors only, for our messages."""
    global _log_callback
    if _log_callback is not None:
        return

    def forward(level, text, _user_data):
        if level >= _GGML_LOG_LEVEL_ERROR and text:
            _last_error[0] = text.decode("utf-8", errors="replace").strip() or _last_error[0]

    _log_callback = llama_cpp.llama_log_callback(forward)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


class LlamaSampler(TokenSampler):
    def __init__(self, lib, ctx, chain):
        self._lib, self._ctx, self._chain = lib, ctx, chain

    def sample(self, row: int) -> int:
        return self._lib.llama_sampler_sample(self._chain, self._ctx, row)  # also accepts the token

    def close(self) -> None:
        chain, self._chain = self._chain, None
        if chain is not None:
            self._lib.llama_sampler_free(chain)


class LlamaCppBackend(Backend):
    name = "llama-cpp"
    can_share_prefix = True

    def __init__(self, path: str, options: LoadOptions):
        super().__init__(path, options)
        try:
            import llama_cpp
        except ImportError:
            raise ModelLoadError("llama-cpp-python is not installed: pip install 'inferq[llama]'") from None
        lib = self._lib = llama_cpp
        _quiet(lib)
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = options.gpu_layers
        _last_error[0] = ""
        self._model = lib.llama_model_load_from_file(path.encode(), mparams)
        if not self._model:
            raise ModelLoadError(f"llama-cpp could not load {path}: {_last_error[0] or 'unsupported file'}")
        self.slots = max(1, options.parallel)
        self.context_length = options.ctx_size or lib.llama_model_n_ctx_train(self._model)
        threads = options.resolved_threads
        cparams = lib.llama_context_default_params()
        # Room for every slot's whole context: a job admitted can never find the cache full.
        cparams.n_ctx = self.context_length * self.slots
        cparams.n_batch = cparams.n_ubatch = max(1, options.batch_size)
        cparams.n_seq_max = self.slots
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = threads  # always explicit
        cparams.no_perf = True
        cparams.flash_attn_type = int(os.environ.get("INFERQ_FLASH_ATTN", "-1"))
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise ModelLoadError(f"llama-cpp could not make a context of {cparams.n_ctx} tokens for {path}: "
                                 f"{_last_error[0] or 'out of memory?'}")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self._memory = lib.llama_get_memory(self._ctx)
        self.vocab_size = lib.llama_vocab_n_tokens(self._vocab)
        self.eos_token_id = lib.llama_vocab_eos(self._vocab)
        self._batch_size = cparams.n_batch
        self._batch = lib.llama_batch_init(self._batch_size, 0, 1)
        self._pieces: dict[int, bytes] = {}
        self._buf = ctypes.create_string_buffer(256)

    # --- tokens ---------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            out = (self._lib.llama_token * size)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), out, size, add_bos, special)
            if n >= 0:
                return out[:n]
            size = -n

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            n = self._lib.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, False)
            if n < 0:  # the piece needs -n bytes
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
                piece = buf.raw[:n]
            else:
                piece = self._buf.raw[:n]
            self._pieces[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    # --- sampling -------------------------------------------------------------------
    def sampler(self, params: SamplingParams, history: Sequence[int]) -> LlamaSampler:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if params.repetition_penalty not in (0.0, 1.0):
            penalties = lib.llama_sampler_init_penalties(self.vocab_size, REPETITION_WINDOW,
                                                         params.repetition_penalty, 0.0, 0.0)
            for token in history[-REPETITION_WINDOW:]:  # the prompt's tail counts as "recent", as before
                lib.llama_sampler_accept(penalties, token)
            lib.llama_sampler_chain_add(chain, penalties)
        if params.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            if 0 < params.top_k < self.vocab_size:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(params.resolved_seed))
        return LlamaSampler(lib, self._ctx, chain)

    # --- decoding -------------------------------------------------------------------
    def decode(self, chunks: Sequence[Chunk]) -> list[int | None]:
        batch = self._batch
        token, pos, n_seq, seq_id, want = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        n = 0
        rows: list[int | None] = []
        for chunk in chunks:
            if n + len(chunk.tokens) > self._batch_size:
                raise ValueError(f"a decode of more than {self._batch_size} tokens")
            p = chunk.pos
            for t in chunk.tokens:
                token[n], pos[n], n_seq[n], want[n] = t, p, 1, 0
                seq_id[n][0] = chunk.slot
                n += 1
                p += 1
            if chunk.logits:
                want[n - 1] = 1
                rows.append(n - 1)
            else:
                rows.append(None)
        batch.n_tokens = n
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        return rows

    def forget(self, slot: int, keep: int) -> None:
        self._lib.llama_memory_seq_rm(self._memory, slot, keep, -1)

    def share(self, src: int, dst: int, n: int) -> None:
        self._lib.llama_memory_seq_rm(self._memory, dst, 0, -1)
        self._lib.llama_memory_seq_cp(self._memory, src, dst, 0, n)

    def logits(self, row: int) -> np.ndarray:
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, row), shape=(self.vocab_size,))

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None or not getattr(self, "_ctx", None):
            return
        lib.llama_batch_free(self._batch)
        lib.llama_free(self._ctx)
        lib.llama_model_free(self._model)
        self._ctx = self._model = None
