"""The protocol every backend implements: decode a batch of sequences, sample, say what tokens are.

A backend holds ``slots`` sequences (one per running job) in its cache and
evaluates chunks of several of them in one ``decode`` call; the scheduler
(``worker.scheduler``) decides what goes into each call. Everything above
the model — stop strings, UTF-8, deadlines, cancels, events — is the
scheduler's, the same for every backend. A backend that cannot batch
(ctransformers) has one slot and runs through the same loop.
"""
from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from queue_schema.errors import CodedError, ErrorCode


class ModelLoadError(CodedError):
    """The model file cannot be served: missing, not GGUF, unsupported."""

    code_default = ErrorCode.MODEL_LOAD_FAILED


@dataclass(frozen=True)
class LoadOptions:
    threads: int = 0  # 0: every core but one
    gpu_layers: int = 0
    ctx_size: int = 0  # per sequence; 0: the model's own
    batch_size: int = 512  # most tokens one decode call evaluates
    parallel: int = 1  # sequences decoded together (slots)

    @property
    def resolved_threads(self) -> int:
        # One core is left to the worker's own threads (publisher, heartbeat):
        # ggml's threads spin at barriers, and a third runnable thread on two
        # cores cut decoding to a twentieth in our measurements.
        return self.threads if self.threads > 0 else max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's sampling settings (the job's; OpenAI's routes fill in OpenAI's defaults)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.1  # over the last 64 tokens, the prompt's tail included
    seed: int = -1  # -1: a random one
    # OpenAI's: minus presence_penalty once, and frequency_penalty per time, for every token already
    # generated (the prompt does not count).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    grammar: str | None = None  # GBNF the output must match (a backend with "grammar" in its capabilities)

    @property
    def resolved_seed(self) -> int:
        return random.getrandbits(32) if self.seed < 0 else self.seed & 0xFFFFFFFF

    @classmethod
    def greedy(cls, repetition_penalty: float = 1.1) -> "SamplingParams":
        return cls(temperature=0.0, repetition_penalty=repetition_penalty)


@dataclass(frozen=True)
class Chunk:
    """Tokens of one sequence for one decode call: ``tokens[0]`` goes at position ``pos``."""

    slot: int
    tokens: Sequence[int]
    pos: int
    logits: bool  # keep the logits after the last token (to sample the next one)


class NoTokenAllowed(CodedError):
    """The sequence's grammar allows no token here (it cannot be completed with this vocabulary)."""

    code_default = ErrorCode.INVALID_REQUEST


class TokenSampler:
    """Picks a sequence's next token from a row of logits, and remembers it."""

    def sample(self, row: int) -> int:
        """The next token; NoTokenAllowed if the grammar rules every token out."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Backend:
    """Base class; see the module docstring."""

    name = "base"
    can_share_prefix = False  # ``share`` copies cached positions between slots
    # What it can do beyond plain generation, published in the worker's heartbeat and checked at
    # submit: grammar (structured output), logprobs, embeddings, chat_template (renders the
    # file's template with its control tokens as tokens; added when the file has one).
    capabilities: frozenset[str] = frozenset({"logprobs"})
    parses_specials = False  # ``tokenize(..., special=True)`` turns control tokens' texts into those tokens

    def __init__(self, path: str, options: LoadOptions):
        self.path = path
        self.options = options
        self.slots = 1
        self.context_length = 0  # per sequence
        self.eos_token_id = -1
        self.bos_token_id = -1
        self.add_bos = True  # the tokenizer puts BOS before a prompt
        self.bos_text = self.eos_text = ""  # the tokens' texts, for chat templates
        self.special_tokens: dict[str, int] = {}  # control tokens' texts (parsed in template text only)
        self.longest_piece = 1  # most bytes of text one token stands for (prompt size guard)
        self.vocab_size = 0
        self.embedding_length = 0
        self.info = None  # GGUFInfo, set by load_backend
        self.reason = ""  # why load_backend chose this backend

    # --- what each backend provides -------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        raise NotImplementedError

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, and the end-of-turn tokens of chat models."""
        return token == self.eos_token_id

    def sampler(self, params: SamplingParams, history: Sequence[int]) -> TokenSampler:
        """A sampler for one sequence; ``history`` (the prompt) feeds the repetition penalty."""
        raise NotImplementedError

    def decode(self, chunks: Sequence[Chunk]) -> list[int | None]:
        """Evaluate the chunks in one call; per chunk, the logits row to sample from (or None)."""
        raise NotImplementedError

    def forget(self, slot: int, keep: int) -> None:
        """Drop the slot's cached positions from ``keep`` on."""

    def share(self, src: int, dst: int, n: int) -> None:
        """Make the first ``n`` positions of slot ``src`` those of slot ``dst`` too."""
        raise NotImplementedError

    def logits(self, row: int) -> np.ndarray:
        raise NotImplementedError

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One vector per input (pooled, not normalized), in as few decode calls as fit; only for a
        backend with "embeddings" in its capabilities, and inputs within ``embed_limits``."""
        raise NotImplementedError

    def embed_limits(self) -> tuple[int, int]:
        """(inputs, tokens) one ``embed`` call takes at most; (0, 0) where it cannot embed."""
        return 0, 0

    gpu_index: int | None = None  # set by the runtime for a worker pinned to a GPU

    def vram_bytes(self) -> int:
        from worker import gpu

        return gpu.process_vram_bytes(self.gpu_index)

    def health(self, slot: int = 0) -> bool:
        """Can the model still decode? Evaluates one token in ``slot`` (which it leaves empty: give it
        one nothing holds) and checks the logits."""
        try:
            self.forget(slot, 0)
            row = self.decode([Chunk(slot, [self.eos_token_id], 0, True)])[0]
            ok = bool(np.isfinite(self.logits(row)).all())
            self.forget(slot, 0)
            return ok
        except Exception:
            return False

    def close(self) -> None:
        pass

    # --- shared ---------------------------------------------------------------------
    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(t) for t in tokens)
