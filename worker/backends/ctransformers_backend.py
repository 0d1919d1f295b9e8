"""ctransformers backend: the one every install has (CPU and CUDA wheels).

We call its C functions directly rather than ``LLM.tokenize``: that method
sizes its output buffer by characters while the C side writes one int per
token, and byte-fallback text (emoji, CJK) has more tokens than characters,
so it overflows the buffer and corrupts the heap.

ctransformers evaluates one sequence at a time: this backend has one slot,
and the scheduler runs it through the same loop as a batching backend.
Sampling is ``worker.sampling``'s numpy sampler (ctransformers re-seeds its
own on every call).
"""
from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from ctypes import c_int

import numpy as np

from worker.backends.base import Backend, Chunk, LoadOptions, ModelLoadError, SamplingParams, TokenSampler
from worker.sampling import Sampler


def _library(gpu_layers: int) -> str | None:
    """Which of ctransformers' bundled libraries to load.

    ctransformers asks py-cpuinfo, which takes over a second; /proc/cpuinfo
    answers the same question at once on Linux. ``INFERQ_CT_LIB`` overrides
    (a bundled name or the path of a library built from source).
    """
    if os.environ.get("INFERQ_CT_LIB"):
        return os.environ["INFERQ_CT_LIB"]
    if gpu_layers > 0 or platform.system() != "Linux":
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    if "avx2" in flags:
        return "avx2"
    if "avx" in flags and "f16c" in flags:
        return "avx"
    return "basic"


class NumpySampler(TokenSampler):
    def __init__(self, backend: "CTransformersBackend", params: SamplingParams, history: Sequence[int]):
        if params.grammar is not None:
            raise ValueError("the ctransformers backend cannot constrain output to a grammar")
        self._backend = backend
        self._sample = Sampler(params.temperature, params.top_k, params.top_p, params.repetition_penalty,
                               params.seed, presence_penalty=params.presence_penalty,
                               frequency_penalty=params.frequency_penalty, logit_bias=params.logit_bias)
        self._recent = list(history[-self._sample.window:])
        self._generated: list[int] = []

    def sample(self, row: int) -> int:
        token = self._sample(self._backend.logits(row), self._recent, self._generated)
        self._recent.append(token)
        self._generated.append(token)
        return token


class CTransformersBackend(Backend):
    name = "ctransformers"

    def __init__(self, path: str, options: LoadOptions, model_type: str | None = None):
        super().__init__(path, options)
        try:
            from ctransformers import LLM
            from ctransformers.llm import Config
        except ImportError as exc:  # pragma: no cover - ctransformers is a base dependency
            raise ModelLoadError(f"ctransformers is not installed: {exc}") from None
        config = Config(context_length=options.ctx_size or -1, gpu_layers=options.gpu_layers,
                        threads=options.resolved_threads, batch_size=options.batch_size)
        try:
            self._llm = LLM(path, model_type=model_type, config=config, lib=_library(options.gpu_layers))
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelLoadError(f"ctransformers could not load {path}: {exc}") from None
        self._lib = self._llm._lib
        self._handle = self._llm._llm
        self.model_type = self._llm.model_type
        self.context_length = self._lib.ctransformers_llm_context_length(self._handle)
        self.eos_token_id = self._lib.ctransformers_llm_eos_token_id(self._handle)
        self.bos_token_id = self._lib.ctransformers_llm_bos_token_id(self._handle)
        self.vocab_size = self._lib.ctransformers_llm_vocab_size(self._handle)
        self._threads = options.resolved_threads
        self._piece_cache: dict[int, bytes] = {}
        # It puts BOS before every prompt, and parses no control token in text (special_tokens stays empty).
        self.add_bos = True
        self.longest_piece = max((len(self.token_bytes(t)) for t in range(self.vocab_size)), default=1)
        self.bos_text = self.token_bytes(self.bos_token_id).decode("utf-8", "replace")
        self.eos_text = self.token_bytes(self.eos_token_id).decode("utf-8", "replace")

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        # ctransformers' tokenizer has no notion of special tokens in text: ``special`` cannot apply.
        data = text.encode("utf-8")
        # At most one token per byte, plus BOS and the leading space SentencePiece adds.
        out = (c_int * (len(data) + 2))()
        n = self._lib.ctransformers_llm_tokenize(self._handle, data, add_bos, out)
        return out[:n]

    def token_bytes(self, token: int) -> bytes:
        piece = self._piece_cache.get(token)
        if piece is None:
            piece = self._lib.ctransformers_llm_detokenize(self._handle, token) or b""
            self._piece_cache[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.ctransformers_llm_is_eos_token(self._handle, token))

    def _eval(self, tokens: Sequence[int], n_past: int) -> None:
        arr = (c_int * len(tokens))(*tokens)
        ok = self._lib.ctransformers_llm_batch_eval(self._handle, arr, len(tokens), n_past,
                                                    self.options.batch_size, self._threads)
        if not ok:
            raise RuntimeError("ctransformers failed to evaluate tokens")

    def sampler(self, params: SamplingParams, history: Sequence[int]) -> NumpySampler:
        return NumpySampler(self, params, history)

    def decode(self, chunks: Sequence[Chunk]) -> list[int | None]:
        rows: list[int | None] = []
        for chunk in chunks:  # one slot: the scheduler never sends two sequences
            self._eval(chunk.tokens, chunk.pos)
            rows.append(0 if chunk.logits else None)
        return rows

    def logits(self, row: int) -> np.ndarray:
        size = self._lib.ctransformers_llm_logits_size(self._handle)
        return np.ctypeslib.as_array(self._lib.ctransformers_llm_logits_data(self._handle), shape=(size,))

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        del llm  # LLM.__del__ frees the C model
