"""Write llama-architecture GGUF files: one writer for the test models and the demo model.

Tensor arrays are laid out as PyTorch's ``nn.Linear.weight`` is, (out, in);
the q/k projections must already rotate adjacent pairs, the rope layout
llama.cpp's llama architecture uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# SentencePiece token types, as llama.cpp reads them from tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer as GGUF stores it: SentencePiece (``llama``) or byte-level BPE (``gpt2``, with merges)."""

    tokens: list[str]
    scores: list[float] | None
    types: list[int]
    unk_id: int | None = 0
    bos_id: int = 1
    eos_id: int = 2
    model: str = "llama"  # tokenizer.ggml.model: llama (SentencePiece) | gpt2 (byte-level BPE)
    pre: str | None = None  # tokenizer.ggml.pre, BPE's pre-tokenizer: llama-bpe (Llama 3), qwen2...
    merges: list[str] | None = None  # BPE merges, "left right", in rank order
    eot_id: int | None = None  # end of turn (<|eot_id|>, <|im_end|>, <end_of_turn>): ends a reply, not EOS
    add_bos: bool | None = None  # None: llama.cpp's default for the tokenizer model
    add_space_prefix: bool | None = None


def write_llama_gguf(path: str | Path, *, name: str, n_ctx: int, n_head: int, n_head_kv: int,
                     vocab: Vocabulary, tensors: dict[str, np.ndarray], arch: str = "llama",
                     rms_eps: float = 1e-5, chat_template: str | None = None) -> Path:
    """Write ``tensors`` (GGUF names → arrays) with llama hyper-parameters read off their shapes."""
    import gguf  # the writer is only needed here, not by the worker at run time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_vocab, n_embd = tensors["token_embd.weight"].shape
    if n_vocab != len(vocab.tokens):
        raise ValueError(f"token_embd has {n_vocab} rows for {len(vocab.tokens)} tokens")
    n_layer = sum(1 for t in tensors if t.endswith(".attn_q.weight"))
    n_ff = tensors["blk.0.ffn_up.weight"].shape[0]
    f16 = tensors["blk.0.attn_q.weight"].dtype == np.float16

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(rms_eps)
    writer.add_file_type(1 if f16 else 0)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    if vocab.unk_id is not None:
        writer.add_unk_token_id(vocab.unk_id)
    if vocab.eot_id is not None:
        writer.add_eot_token_id(vocab.eot_id)
    if vocab.add_bos is not None:
        writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if chat_template:
        writer.add_chat_template(chat_template)
    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
