"""Tiny llama-architecture GGUF files with random weights, for tests and benchmarks.

The files are real GGUF: the worker loads and decodes them with the same code
paths as a downloaded model. Weights are random (seeded), so the text is
gibberish, but it is deterministic for a given seed, which is what tests need.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inferq.gguf_llama import BYTE, CONTROL, NORMAL, UNKNOWN, Vocabulary, write_llama_gguf

_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an "
    "def class import return self if else for while None True False print value "
    "data model token queue worker job redis stream event"
).split()


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a llama model; the defaults make a ~100 KB file."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 128
    n_ctx: int = 512
    extra_vocab: int = 0  # pad the vocabulary with filler pieces (bigger output layer)


SHAPES = {
    "tiny": ModelShape(),
    # Long context and ~1 ms per token: room to cancel a job mid-stream.
    "slow": ModelShape(n_embd=256, n_layer=4, n_head=4, n_head_kv=4, n_ff=512, n_ctx=4096),
    # Tens of millions of parameters: several ms per token on 2 CPU cores.
    "small": ModelShape(n_embd=512, n_layer=8, n_head=8, n_head_kv=8, n_ff=1536, n_ctx=2048, extra_vocab=7500),
}


def vocabulary(extra: int = 0) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: specials, 256 byte-fallback pieces, words."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [UNKNOWN, CONTROL, CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    pieces = ["\u2581"] + list(string.ascii_letters + string.digits + string.punctuation)
    pieces += ["\u2581" + c for c in string.ascii_letters]
    pieces += ["\u2581" + w for w in _WORDS] + [w for w in _WORDS]
    pieces += ["\u2581" + f"w{i}" for i in range(extra)]
    seen = set(tokens)
    for p in pieces:
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(NORMAL)
    # Longer pieces score higher so the merge-based tokenizer prefers them.
    scores = [0.0] * 259 + [-1000.0 + 10 * len(t) for t in tokens[259:]]
    return tokens, scores, types


def make_llama_gguf(path: str | Path, shape: ModelShape | str = "tiny", seed: int = 0,
                    dtype: str = "f32", chat_template: str | None = None, arch: str = "llama") -> Path:
    """Write a llama GGUF with random weights to ``path`` and return the path.

    ``arch="qwen2"`` adds the q/k/v biases Qwen 2 has, giving a file only
    llama-cpp can serve; any other name only renames the architecture, a way
    to make a file that a backend must refuse.
    """
    if isinstance(shape, str):
        shape = SHAPES[shape]
    vocab = Vocabulary(*vocabulary(shape.extra_vocab))
    rng = np.random.default_rng(seed)
    wtype = {"f32": np.float32, "f16": np.float16}[dtype]

    def weight(*dims: int, scale: float | None = None) -> np.ndarray:
        scale = scale if scale is not None else 1.0 / np.sqrt(dims[-1])
        return (rng.standard_normal(dims, dtype=np.float32) * scale).astype(wtype)

    n_vocab, d = len(vocab.tokens), shape.n_embd
    kv = d // shape.n_head * shape.n_head_kv
    norm = lambda: np.ones(d, dtype=np.float32)  # noqa: E731 - norms stay f32 as in real files
    tensors = {"token_embd.weight": weight(n_vocab, d, scale=1.0)}
    for i in range(shape.n_layer):
        tensors[f"blk.{i}.attn_norm.weight"] = norm()
        tensors[f"blk.{i}.attn_q.weight"] = weight(d, d)
        tensors[f"blk.{i}.attn_k.weight"] = weight(kv, d)
        tensors[f"blk.{i}.attn_v.weight"] = weight(kv, d)
        if arch == "qwen2":
            for name, size in (("q", d), ("k", kv), ("v", kv)):
                tensors[f"blk.{i}.attn_{name}.bias"] = weight(size, scale=0.02).astype(np.float32)
        tensors[f"blk.{i}.attn_output.weight"] = weight(d, d)
        tensors[f"blk.{i}.ffn_norm.weight"] = norm()
        tensors[f"blk.{i}.ffn_gate.weight"] = weight(shape.n_ff, d)
        tensors[f"blk.{i}.ffn_up.weight"] = weight(shape.n_ff, d)
        tensors[f"blk.{i}.ffn_down.weight"] = weight(d, shape.n_ff)
    tensors["output_norm.weight"] = norm()
    tensors["output.weight"] = weight(n_vocab, d, scale=4.0 / np.sqrt(d))
    return write_llama_gguf(path, name=f"inferq-test-{d}x{shape.n_layer}-s{seed}", n_ctx=shape.n_ctx,
                            n_head=shape.n_head, n_head_kv=shape.n_head_kv, vocab=vocab, tensors=tensors,
                            arch=arch, chat_template=chat_template)
