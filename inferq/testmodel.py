"""Tiny llama-architecture GGUF files with random weights, for tests and benchmarks.

The files are real GGUF: the worker loads and decodes them with the same code
paths as a downloaded model. Weights are random (seeded), so the text is
gibberish, but it is deterministic for a given seed, which is what tests need.

``make_chat_gguf`` writes the chat models of today in miniature: their
tokenizers (SentencePiece or byte-level BPE with merges), their control
tokens, their end-of-turn token and their real chat templates (ChatML as
Qwen 2 writes it, Llama 3, Gemma, Mistral).

``make_scripted_gguf`` writes such a chat model whose every reply is a given
text: a real model that emits exactly the tool call a parser test wants.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from inferq.gguf_llama import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, Vocabulary, write_llama_gguf
from worker.chat_template import builtin

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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (space is "Ġ", newline "Ċ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(printable, map(chr, printable))), 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(chars.items()))


BPE_WORDS = _WORDS + ["user", "assistant", "system", "model", "hello", "there", "helpful", "You", "are", "a"]


def bpe_vocabulary(specials: list[str]) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary: the 256 bytes, merges that build some words, then ``specials`` (control)."""
    alphabet = _bytes_to_unicode()
    tokens = list(alphabet.values())
    seen, merges = set(tokens), []
    for word in BPE_WORDS:
        for text in (word, " " + word):
            chars = [alphabet[b] for b in text.encode()]
            left = chars[0]
            for c in chars[1:]:
                if left + c not in seen:
                    seen.add(left + c)
                    tokens.append(left + c)
                    merges.append(f"{left} {c}")
                left += c
    newline = alphabet[ord("\n")]
    tokens.append(newline * 2)
    merges.append(f"{newline} {newline}")
    types = [NORMAL] * len(tokens) + [CONTROL] * len(specials)
    return tokens + specials, types, merges


# The templates as the models' tokenizer_config.json files carry them (Qwen 2 without its tool branch): the
# worker's built-ins, which a file without a template can be served with.
CHATML_TEMPLATE, LLAMA3_TEMPLATE, GEMMA_TEMPLATE = (builtin(n) for n in ("chatml", "llama3", "gemma"))


def chat_vocabulary(flavour: str) -> Vocabulary:
    """The tokenizer of a chat model family, in miniature."""
    if flavour == "chatml":  # Qwen 2: BPE, no BOS, <|endoftext|> is EOS, <|im_end|> ends a turn
        tokens, types, merges = bpe_vocabulary(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        n = len(tokens)
        return Vocabulary(tokens, None, types, unk_id=None, bos_id=n - 3, eos_id=n - 3, model="gpt2", pre="qwen2",
                          merges=merges, eot_id=n - 1, add_bos=False)
    if flavour == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>"]
        tokens, types, merges = bpe_vocabulary(specials)
        first = len(tokens) - len(specials)
        return Vocabulary(tokens, None, types, unk_id=None, bos_id=first, eos_id=first + 1, model="gpt2",
                          pre="llama-bpe", merges=merges, eot_id=first + 4, add_bos=True)
    if flavour == "gemma":  # SentencePiece without the space prefix, as Gemma's files are
        base, scores, types = vocabulary()
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
        kinds = [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL, CONTROL]
        return Vocabulary(specials + base[3:], [0.0] * 6 + scores[3:], kinds + types[3:], unk_id=3, bos_id=2,
                          eos_id=1, eot_id=5, add_bos=True, add_space_prefix=False)
    if flavour == "mistral":  # SentencePiece as Llama 2 has it, with Mistral v0.3's tool controls after </s>
        base, scores, types = vocabulary()
        # [TOOL_CALLS] is a control token in Mistral's own files, so llama.cpp would never show it; here it
        # is user-defined: one token in a prompt, and a reply that emits it shows it, as parsers expect.
        specials = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
        kinds = [CONTROL, CONTROL, USER_DEFINED, CONTROL, CONTROL, CONTROL, CONTROL]
        return Vocabulary(base[:3] + specials + base[3:], scores[:3] + [0.0] * 7 + scores[3:],
                          types[:3] + kinds + types[3:], add_bos=True)
    raise ValueError(f"unknown chat flavour {flavour!r}; choose {', '.join(CHAT_TEMPLATES)}")


CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "gemma": GEMMA_TEMPLATE,
                  "mistral": builtin("mistral")}
CHAT_ARCHS = {"chatml": "qwen2", "llama3": "llama", "gemma": "llama", "mistral": "llama"}


def make_chat_gguf(path: str | Path, flavour: str, shape: ModelShape | str = "tiny", seed: int = 0) -> Path:
    """A random-weight chat model of ``flavour`` (chatml, llama3, gemma, mistral) with its tokenizer and
    template."""
    return make_llama_gguf(path, shape, seed, chat_template=CHAT_TEMPLATES[flavour], arch=CHAT_ARCHS[flavour],
                           vocab=chat_vocabulary(flavour))


def make_llama_gguf(path: str | Path, shape: ModelShape | str = "tiny", seed: int = 0,
                    dtype: str = "f32", chat_template: str | None = None, arch: str = "llama",
                    vocab: Vocabulary | None = None) -> Path:
    """Write a llama GGUF with random weights to ``path`` and return the path.

    ``arch="qwen2"`` adds the q/k/v biases Qwen 2 has, giving a file only
    llama-cpp can serve; any other name only renames the architecture, a way
    to make a file that a backend must refuse.
    """
    if isinstance(shape, str):
        shape = SHAPES[shape]
    vocab = vocab or Vocabulary(*vocabulary(shape.extra_vocab))
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


# The scripted model's logit for the next token of its script; every other token gets 0, so even sampling at
# temperature 1 strays from the script with odds of about vocabulary size × e^-30 a token.
_SCRIPT_LOGIT = 30.0


def script_pieces(script: str, first_id: int = 0) -> list[str]:
    """The token texts of ``script``'s chain: one byte-fallback token per UTF-8 byte, made unique by its id.

    llama.cpp refuses a vocabulary with two tokens of one text, so a byte the script repeats needs a token
    of its own at each place; a byte token's value is read from its text's characters 3-4 only ("<0x41>…"),
    in SentencePiece and BPE alike. No tokenizer makes these tokens from text: nothing in the vocabulary
    starts with "<0" for SentencePiece to merge up to, BPE has no merge to them, and Llama 3's whole-word
    lookup never sees "<" and "0" in one word.
    """
    return [f"<0x{b:02X}>{first_id + k}" for k, b in enumerate(script.encode("utf-8"))]


def scripted_vocabulary(flavour: str, script: str) -> Vocabulary:
    """The flavour's tokenizer with ``script``'s chain tokens after it: every base id stays where it was."""
    base = chat_vocabulary(flavour)
    chain = script_pieces(script, len(base.tokens))
    scores = None if base.scores is None else base.scores + [0.0] * len(chain)
    return replace(base, tokens=base.tokens + chain, scores=scores, types=base.types + [BYTE] * len(chain))


def _chain_tensors(n_vocab: int, first: int, length: int, end: int, arch: str) -> dict[str, np.ndarray]:
    """Weights whose greedy next token depends on the current token only: a bigram model of the chain.

    Attention and the FFN write nothing (zero output projections), so the last hidden state is the current
    token's embedding. Embedding dimension 0 stands for every token outside the chain (whatever ends a
    prompt), dimension k + 1 for chain token k; the output layer maps dimension j to chain token j, and
    the dimension of the last chain token to ``end``.
    """
    d = -(-(length + 1) // 32) * 32  # one dimension per state, 32 per head
    embd = np.zeros((n_vocab, d), dtype=np.float32)
    embd[:, 0] = 1.0
    embd[first:first + length, 0] = 0.0
    embd[np.arange(first, first + length), np.arange(1, length + 1)] = 1.0
    output = np.zeros((n_vocab, d), dtype=np.float32)
    targets = [first + j for j in range(length)] + [end]
    # RMS norm scales a one-hot state to sqrt(d): divide it out so the logit is exactly _SCRIPT_LOGIT.
    output[targets, np.arange(length + 1)] = _SCRIPT_LOGIT / np.sqrt(d)
    zeros = lambda *dims: np.zeros(dims, dtype=np.float32)  # noqa: E731
    tensors = {"token_embd.weight": embd, "blk.0.attn_norm.weight": np.ones(d, dtype=np.float32)}
    for name in ("q", "k", "v", "output"):
        tensors[f"blk.0.attn_{name}.weight"] = zeros(d, d)
    if arch == "qwen2":
        for name in ("q", "k", "v"):
            tensors[f"blk.0.attn_{name}.bias"] = zeros(d)
    n_ff = 32
    tensors.update({"blk.0.ffn_norm.weight": np.ones(d, dtype=np.float32), "blk.0.ffn_gate.weight": zeros(n_ff, d),
                    "blk.0.ffn_up.weight": zeros(n_ff, d), "blk.0.ffn_down.weight": zeros(d, n_ff),
                    "output_norm.weight": np.ones(d, dtype=np.float32), "output.weight": output})
    return tensors


def make_scripted_gguf(path: str | Path, script: str, flavour: str = "chatml", n_ctx: int = 512) -> Path:
    """A chat model of ``flavour`` whose reply to any prompt is ``script``, then its end-of-turn token.

    The file has the flavour's tokenizer, control tokens and template, as ``make_chat_gguf`` writes them,
    plus one token per byte of ``script`` (see ``script_pieces``), which no prompt tokenizes to. Greedy
    decoding (and, in practice, sampling) walks that chain from whatever token ends the prompt: the reply's
    text is ``script`` byte for byte and it stops at end of turn (end of sequence for mistral, which has
    no end-of-turn token). A request's logit bias or grammar can still steer it off the script.
    """
    vocab = scripted_vocabulary(flavour, script)
    first = len(chat_vocabulary(flavour).tokens)
    end = vocab.eot_id if vocab.eot_id is not None else vocab.eos_id
    arch = CHAT_ARCHS[flavour]
    tensors = _chain_tensors(len(vocab.tokens), first, len(vocab.tokens) - first, end, arch)
    d = tensors["token_embd.weight"].shape[1]
    return write_llama_gguf(path, name=f"inferq-scripted-{flavour}", n_ctx=n_ctx, n_head=d // 32,
                            n_head_kv=d // 32, vocab=vocab, tensors=tensors, arch=arch,
                            chat_template=CHAT_TEMPLATES[flavour])
