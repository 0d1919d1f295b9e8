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

# SentencePiece token types, as llama.cpp reads them from tokenizer.ggml.token_type.
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6
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
    types = [_UNKNOWN, _CONTROL, _CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    pieces = ["\u2581"] + list(string.ascii_letters + string.digits + string.punctuation)
    pieces += ["\u2581" + c for c in string.ascii_letters]
    pieces += ["\u2581" + w for w in _WORDS] + [w for w in _WORDS]
    pieces += ["\u2581" + f"w{i}" for i in range(extra)]
    seen = set(tokens)
    for p in pieces:
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(_NORMAL)
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
    import gguf  # the writer is only needed here, not by the worker at run time

    if isinstance(shape, str):
        shape = SHAPES[shape]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, scores, types = vocabulary(shape.extra_vocab)
    rng = np.random.default_rng(seed)
    wtype = {"f32": np.float32, "f16": np.float16}[dtype]

    def weight(*dims: int, scale: float | None = None) -> np.ndarray:
        scale = scale if scale is not None else 1.0 / np.sqrt(dims[-1])
        return (rng.standard_normal(dims, dtype=np.float32) * scale).astype(wtype)

    head_dim = shape.n_embd // shape.n_head
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"inferq-test-{shape.n_embd}x{shape.n_layer}-s{seed}")
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0 if dtype == "f32" else 1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if chat_template:
        writer.add_chat_template(chat_template)

    n_vocab, d, kv = len(tokens), shape.n_embd, head_dim * shape.n_head_kv
    norm = lambda: np.ones(d, dtype=np.float32)  # noqa: E731 - norms stay f32 as in real files
    writer.add_tensor("token_embd.weight", weight(n_vocab, d, scale=1.0))
    for i in range(shape.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(d, d))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv, d))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv, d))
        if arch == "qwen2":
            for name, size in (("q", d), ("k", kv), ("v", kv)):
                writer.add_tensor(f"blk.{i}.attn_{name}.bias", weight(size, scale=0.02).astype(np.float32))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(d, d))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(shape.n_ff, d))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(shape.n_ff, d))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(d, shape.n_ff))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(n_vocab, d, scale=4.0 / np.sqrt(d)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
