"""llama.cpp through llama-cpp-python's C API: batched decoding of many sequences at once.

One context holds ``parallel`` sequences in a unified KV cache (``kv_unified``),
so a prefix two sequences share can be copied between them instead of being
evaluated twice. ``decode`` puts every sequence's next token, and chunks of
prompts, in one ``llama_decode``; sampling is llama.cpp's own sampler chain
per sequence, in C, so the Python cost per token does not grow with the
vocabulary.

A sequence with a grammar (structured output) has llama.cpp's grammar
sampler in its chain and is sampled through ``llama_sampler_apply`` on a
candidates array we hold, so a grammar that rules out every token is seen and
ends that job, where ``llama_sampler_sample`` would accept a forbidden token
and llama.cpp would abort the process. The array also rules out tokens whose
bytes would make the output invalid UTF-8 (a stray byte-fallback token): the
grammar reads a lone continuation byte as a character of its own, and the
text would not be what it matched. Prompt tokens are fed to the repetition
penalty only, never to the grammar.

Embeddings use a second, small context on the same weights (``embeddings``
on, the model's pooling or mean), made at the first embed job and used only
by the engine thread, like the first.

The high-level ``Llama`` class is not used: it owns one sequence. The C
functions' ctypes signatures follow the llama.cpp that llama-cpp-python
vendors (``setup.cfg`` pins the range we test against).
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
from collections.abc import Sequence

import numpy as np

from worker.backends.base import (
    Backend,
    Chunk,
    LoadOptions,
    ModelLoadError,
    NoTokenAllowed,
    SamplingParams,
    TokenSampler,
)

log = logging.getLogger(__name__)
REPETITION_WINDOW = 64  # the numpy sampler's window: both backends penalize alike
PENALTY_WINDOW = 4096  # presence/frequency penalties look at every generated token (max_tokens at most)
_ATTR_UNKNOWN, _ATTR_CONTROL = 1 << 0, 1 << 3
_POOLING_NONE, _POOLING_MEAN, _POOLING_RANK = 0, 1, 4
EMBED_MAX_TOKENS = 2048  # the embedding context: tokens per decode, and so per input
EMBED_MAX_SEQS = 16  # inputs per decode
_CANDIDATE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
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


def _in_background(fn, *args):
    """Start ``fn(*args)`` on a thread; the function returned waits for it and returns what it raised."""
    failure: list[BaseException] = []

    def run():
        try:
            fn(*args)
        except BaseException as exc:  # handed to the caller, which decides
            failure.append(exc)

    thread = threading.Thread(target=run, name="inferq-vocabulary", daemon=True)
    thread.start()

    def join() -> BaseException | None:
        thread.join()
        return failure[0] if failure else None

    return join


class Utf8Guard:
    """Which tokens keep a sequence's bytes valid UTF-8, given how many continuation bytes it owes."""

    def __init__(self, pieces: list[bytes]):
        n = len(pieces)
        self.length = np.zeros(n, np.int32)
        self.lead = np.zeros(n, np.int32)  # leading continuation bytes
        self.tail_ok = np.ones(n, bool)  # the rest is valid UTF-8, perhaps ending inside a character
        self.tail_need = np.zeros(n, np.int32)  # continuation bytes the rest leaves owing
        for t, piece in enumerate(pieces):
            c = 0
            while c < len(piece) and 0x80 <= piece[c] <= 0xBF:
                c += 1
            self.length[t], self.lead[t] = len(piece), c
            self.tail_ok[t], self.tail_need[t] = _utf8_rest(piece[c:])

    def allowed(self, need: int) -> np.ndarray:
        fits = (self.lead == need) & self.tail_ok
        if need:
            fits |= (self.lead == self.length) & (self.length > 0) & (self.length < need)  # some of what it owes
        return fits

    def after(self, need: int, token: int) -> int:
        if need and self.lead[token] == self.length[token] < need:
            return need - int(self.length[token])
        return int(self.tail_need[token])


def _utf8_rest(data: bytes) -> tuple[bool, int]:
    for back in range(1, min(4, len(data)) + 1):  # an unfinished character at the end?
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue
        size = 2 if 0xC2 <= byte <= 0xDF else 3 if 0xE0 <= byte <= 0xEF else 4 if 0xF0 <= byte <= 0xF4 else 1
        if size > back:
            head, owed = data[:-back], size - back
            break
        head, owed = data, 0
        break
    else:
        head, owed = data, 0
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False, 0
    return True, owed


class LlamaSampler(TokenSampler):
    def __init__(self, backend: "LlamaCppBackend", chain, checked: bool):
        self._backend, self._lib, self._ctx, self._chain = backend, backend._lib, backend._ctx, chain
        self._checked = checked  # sampled through our own candidates array (a grammar may rule out all)
        self._cands = np.empty(backend.vocab_size, dtype=_CANDIDATE) if checked else None
        self._utf8 = backend.utf8_guard() if checked else None
        self._owed = 0  # continuation bytes the output owes

    def sample(self, row: int) -> int:
        if not self._checked:
            return self._lib.llama_sampler_sample(self._chain, self._ctx, row)  # also accepts the token
        lib, cands = self._lib, self._cands
        cands["id"] = np.arange(len(cands), dtype=np.int32)
        cands["logit"] = np.where(self._utf8.allowed(self._owed), self._backend.logits(row), -np.inf)
        cands["p"] = 0.0
        cur = lib.llama_token_data_array(cands.ctypes.data_as(lib.llama_token_data_p), len(cands), -1, False)
        lib.llama_sampler_apply(self._chain, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size or not math.isfinite(cur.data[cur.selected].logit):
            raise NoTokenAllowed("the grammar allows no token of this model's vocabulary here")
        token = int(cur.data[cur.selected].id)
        lib.llama_sampler_accept(self._chain, token)
        self._owed = self._utf8.after(self._owed, token)
        return token

    def close(self) -> None:
        chain, self._chain = self._chain, None
        if chain is not None:
            self._lib.llama_sampler_free(chain)


class LlamaCppBackend(Backend):
    name = "llama-cpp"
    can_share_prefix = True
    capabilities = frozenset({"logprobs", "grammar", "embeddings"})
    parses_specials = True

    def __init__(self, path: str, options: LoadOptions, info=None):
        super().__init__(path, options)
        self.info = info
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
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.vocab_size = lib.llama_vocab_n_tokens(self._vocab)
        self.eos_token_id = lib.llama_vocab_eos(self._vocab)
        self.bos_token_id = lib.llama_vocab_bos(self._vocab)
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self._pieces: dict[int, bytes] = {}
        self._buf = ctypes.create_string_buffer(256)
        # The vocabulary pass asks the engine about every token (262k ctypes calls on Gemma 3, 0.2 s); it
        # runs while llama.cpp makes the context, which releases the GIL, so a second core hides it.
        reading = _in_background(self._read_vocabulary, info.longest_token if info is not None else 0)
        try:
            n_ctx = self._make_context(options)
        finally:
            failure = reading()  # before the model can be freed: the pass reads its vocabulary
        if not self._ctx or failure is not None:
            if self._ctx:
                lib.llama_free(self._ctx)
            lib.llama_model_free(self._model)
            self._ctx = self._model = None
            if failure is not None:
                raise failure
            raise ModelLoadError(f"llama-cpp could not make a context of {n_ctx} tokens for {path}: "
                                 f"{_last_error[0] or 'out of memory?'}")
        self._memory = lib.llama_get_memory(self._ctx)
        self.embedding_length = lib.llama_model_n_embd_out(self._model)
        self._batch = lib.llama_batch_init(self._batch_size, 0, 1)
        self._pooling = self._pooling_type()
        if self._pooling == _POOLING_RANK:  # a reranker: its "embedding" is a score
            self.capabilities = self.capabilities - {"embeddings"}
        self._ectx = self._ebatch = None
        self._utf8: Utf8Guard | None = None

    def _make_context(self, options: LoadOptions) -> int:
        """Make the context of every slot into ``_ctx`` (NULL when llama.cpp cannot); its size in tokens."""
        lib = self._lib
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
        self._batch_size = cparams.n_batch
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        return cparams.n_ctx

    def utf8_guard(self) -> Utf8Guard:
        """Made at the first grammar job (a pass over the vocabulary); read-only after, any thread."""
        if self._utf8 is None:
            self._utf8 = Utf8Guard([self.token_bytes(t) for t in range(self.vocab_size)])
        return self._utf8

    def _read_vocabulary(self, longest_text: int) -> None:
        """Control tokens' texts (parsed in chat template text) and the longest piece (prompt size guard).

        ``longest_text`` is the longest token text in the file (gguf_meta): no piece is longer, so it bounds
        the guard without a piece per token, which cost a second on a 262k vocabulary. The attributes are
        asked of the engine for every token all the same: llama.cpp marks some tokens control by their text."""
        lib, vocab = self._lib, self._vocab
        longest, specials = 1, {}
        special = _ATTR_CONTROL | _ATTR_UNKNOWN
        get_attr = lib.llama_vocab_get_attr
        for token in range(self.vocab_size):
            is_special = get_attr(vocab, token) & special
            if longest_text and not is_special:
                continue
            text = self._piece(token, special=True)
            longest = max(longest, len(text))
            if is_special and text:
                specials.setdefault(text.decode("utf-8", errors="replace"), token)
        self.longest_piece, self.special_tokens = max(longest, longest_text), specials
        self.bos_text = self._piece(self.bos_token_id, special=True).decode("utf-8", "replace") \
            if self.bos_token_id >= 0 else ""
        self.eos_text = self._piece(self.eos_token_id, special=True).decode("utf-8", "replace") \
            if self.eos_token_id >= 0 else ""

    def _pooling_type(self) -> int:
        arch = (self.info.architecture if self.info else None) or self._meta("general.architecture") or ""
        raw = self._meta(f"{arch}.pooling_type")
        try:
            pooling = int(raw) if raw is not None else _POOLING_NONE
        except ValueError:
            pooling = _POOLING_NONE
        return _POOLING_MEAN if pooling == _POOLING_NONE else pooling  # a generative model: mean of its states

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(128)
        n = self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

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
            piece = self._pieces[token] = self._piece(token, special=False)  # control tokens: no text
        return piece

    def _piece(self, token: int, special: bool) -> bytes:
        n = self._lib.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, special)
        if n >= 0:
            return self._buf.raw[:n]
        buf = ctypes.create_string_buffer(-n)  # the piece needs -n bytes
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    # --- sampling -------------------------------------------------------------------
    def sampler(self, params: SamplingParams, history: Sequence[int]) -> LlamaSampler:
        """The sequence's chain: logit bias, penalties, grammar, then greedy or top-k/top-p/temperature.

        ValueError for a grammar llama.cpp cannot parse (with its message). Safe to call on a thread
        that is not the engine's: it reads the vocabulary only.
        """
        lib = self._lib
        grammar = None
        if params.grammar is not None:
            _last_error[0] = ""
            grammar = lib.llama_sampler_init_grammar(self._vocab, params.grammar.encode("utf-8"), b"root")
            if not grammar:
                raise ValueError(f"invalid grammar: {_last_error[0] or 'llama.cpp could not parse it'}")
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if params.logit_bias:
            biases = (lib.llama_logit_bias * len(params.logit_bias))(*params.logit_bias)
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(self.vocab_size, len(biases),
                                                                                 biases))
        if params.repetition_penalty not in (0.0, 1.0):
            penalties = lib.llama_sampler_init_penalties(self.vocab_size, REPETITION_WINDOW,
                                                         params.repetition_penalty, 0.0, 0.0)
            for token in history[-REPETITION_WINDOW:]:  # the prompt's tail counts as "recent", as before
                lib.llama_sampler_accept(penalties, token)
            lib.llama_sampler_chain_add(chain, penalties)
        if params.presence_penalty or params.frequency_penalty:  # generated tokens only: no history
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(
                self.vocab_size, PENALTY_WINDOW, 1.0, params.frequency_penalty, params.presence_penalty))
        if grammar is not None:  # before any truncation: it must see every candidate
            lib.llama_sampler_chain_add(chain, grammar)
        if params.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            if 0 < params.top_k < self.vocab_size:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(params.resolved_seed))
        return LlamaSampler(self, chain, checked=grammar is not None)

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

    # --- embeddings -----------------------------------------------------------------
    def embed_limits(self) -> tuple[int, int]:
        if "embeddings" not in self.capabilities:
            return 0, 0
        return EMBED_MAX_SEQS, min(self.context_length, EMBED_MAX_TOKENS)

    def _embedding_context(self):
        if self._ectx is None:
            lib = self._lib
            _, tokens = self.embed_limits()
            cparams = lib.llama_context_default_params()
            # One ubatch per decode: pooling reads a sequence's states from a single ubatch.
            cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = tokens
            cparams.n_seq_max = EMBED_MAX_SEQS
            cparams.kv_unified = True
            cparams.embeddings = True
            cparams.pooling_type = self._pooling
            cparams.n_threads = cparams.n_threads_batch = self.options.resolved_threads
            cparams.no_perf = True
            ctx = lib.llama_init_from_model(self._model, cparams)
            if not ctx:
                raise MemoryError(f"llama-cpp could not make an embedding context of {tokens} tokens: "
                                  f"{_last_error[0] or 'out of memory?'}")
            self._ectx, self._ebatch = ctx, lib.llama_batch_init(tokens, 0, 1)
        return self._ectx

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        lib = self._lib
        ctx = self._embedding_context()
        seqs, tokens = self.embed_limits()
        if len(inputs) > seqs or sum(map(len, inputs)) > tokens:
            raise ValueError(f"an embed call of more than {seqs} inputs or {tokens} tokens")
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        batch = self._ebatch
        n = 0
        for s, ids in enumerate(inputs):
            for p, t in enumerate(ids):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = t, p, 1, 1
                batch.seq_id[n][0] = s
                n += 1
        batch.n_tokens = n
        if lib.llama_model_has_encoder(self._model) and not lib.llama_model_has_decoder(self._model):
            status = lib.llama_encode(ctx, batch)
        else:
            status = lib.llama_decode(ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} (embeddings)")
        out = []
        for s in range(len(inputs)):
            ptr = lib.llama_get_embeddings_seq(ctx, s)
            if not ptr:
                raise RuntimeError("llama.cpp gave no pooled embedding")
            out.append(np.ctypeslib.as_array(ptr, shape=(self.embedding_length,)).copy())
        return out

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None or not getattr(self, "_ctx", None):
            return
        if self._ectx is not None:
            lib.llama_batch_free(self._ebatch)
            lib.llama_free(self._ectx)
            self._ectx = None
        lib.llama_batch_free(self._batch)
        lib.llama_free(self._ctx)
        lib.llama_model_free(self._model)
        self._ctx = self._model = None
