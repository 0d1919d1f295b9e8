"""Train inferq's demo model: a tiny Llama that writes Python, from the standard library's source.

    make demo-model        # = the two lines below
    python -m venv .train-venv && .train-venv/bin/pip install -e '.[train]'
    .train-venv/bin/python models/train_demo.py --seed 0

Everything comes from this machine: the corpus is the running Python's own
standard library (PSF license), the tokenizer is a SentencePiece BPE trained
on it, the model is trained on the CPU. It writes, next to this file:

- ``demo.gguf``: the model, llama architecture, f16, with the SentencePiece
  vocabulary (pieces, scores, token types) that llama.cpp tokenizes with;
- ``demo-reference.json``: what the PyTorch model says, for the tests to hold
  the GGUF backends to: its greedy continuations (with each step's margin
  between the best and second-best logit) and its tokenization of some text;
- ``demo-tokenizer.model`` (and ``.vocab``): the SentencePiece model itself;
- ``demo-training.json`` and ``demo-loss.png``: the run's figures and curve.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing inferq

from inferq.gguf_llama import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, Vocabulary  # noqa: E402
from inferq.gguf_llama import write_llama_gguf  # noqa: E402

BOS, EOS = 1, 2
# Codec tables and the test suites are mostly data, not the Python people write.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "encodings", "__pycache__"}
PROMPTS = ["def ", "import ", "class ", "    def __init__(self", "for i in range(", "# Copyright"]


def corpus() -> list[tuple[str, str]]:
    """(path, text) of every standard-library module, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            files.append((rel.as_posix(), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return files


def held_out(rel: str) -> bool:
    # By a hash of the path, so the split doesn't move when a module is added.
    return zlib.crc32(rel.encode()) % 20 == 0


def train_tokenizer(texts: list[str], vocab_size: int, workdir: Path) -> spm.SentencePieceProcessor:
    # The trainer reads lines; a newline itself becomes the byte piece <0x0A>,
    # as in Llama's own tokenizer. Identity normalization keeps indentation.
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    prefix = workdir / "demo-tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=4096, unk_id=0, bos_id=BOS, eos_id=EOS, pad_id=-1,
        num_threads=2, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(prefix) + ".model")


def gguf_vocabulary(sp: spm.SentencePieceProcessor) -> Vocabulary:
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(UNKNOWN)
        elif sp.is_control(i):
            types.append(CONTROL)
        elif sp.is_byte(i):
            types.append(BYTE)
        elif sp.is_unused(i):
            types.append(UNUSED)
        else:
            types.append(NORMAL)
    return Vocabulary(tokens, scores, types, unk_id=0, bos_id=BOS, eos_id=EOS)


def token_stream(sp: spm.SentencePieceProcessor, texts: list[str], space_split: float = 0.0,
                 seed: int = 0) -> np.ndarray:
    """The files' tokens end to end, each file closed by EOS (so the model learns to stop).

    ``space_split`` is the share of word pieces ("▁word") written as "▁" then
    "word": a prompt typed as ``"def "`` ends in a lone space piece, which
    canonical tokenization never produces, and the model must have seen one.
    (BPE-dropout does this too, but also shreds identifiers into "_" runs that
    a small model then repeats forever.)
    """
    space = sp.piece_to_id("\u2581")
    rest = np.full(sp.get_piece_size(), -1, dtype=np.int64)
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581") and len(piece) > 1 and not sp.is_unknown(j := sp.piece_to_id(piece[1:])):
            rest[i] = j
    rng = np.random.default_rng(seed)
    ids = []
    for piece_ids in sp.encode(texts):
        ids.extend(piece_ids)
        ids.append(EOS)
    ids = np.asarray(ids, dtype=np.int64)
    if not space_split:
        return ids
    split = (rest[ids] >= 0) & (rng.random(len(ids)) < space_split)
    out = np.empty(len(ids) + split.sum(), dtype=np.int64)
    pos = np.arange(len(ids)) + np.cumsum(split) - split  # where each original token lands
    out[pos] = np.where(split, space, ids)
    out[pos[split] + 1] = rest[ids[split]]
    return out


# --- the model: the llama architecture as llama.cpp computes it -------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, n_ctx: int, base: float = 10000.0):
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_ctx, dtype=torch.float64), inv)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    # Adjacent pairs (x0, x1), (x2, x3)... rotate together: llama.cpp's "normal" rope,
    # so the q/k weights go into the GGUF as they are, with no permutation.
    t = x.shape[-2]
    x = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    c, s = cos[:t], sin[:t]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, dim: int, n_head: int, ffn: int, eps: float):
        super().__init__()
        self.n_head = n_head
        self.attn_norm = RMSNorm(dim, eps)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = RMSNorm(dim, eps)
        self.gate = nn.Linear(dim, ffn, bias=False)
        self.up = nn.Linear(dim, ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        h = self.attn_norm(x)
        heads = lambda y: y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)  # noqa: E731
        q = apply_rope(heads(self.q(h)), cos, sin).type_as(h)
        k = apply_rope(heads(self.k(h)), cos, sin).type_as(h)
        a = F.scaled_dot_product_attention(q, k, heads(self.v(h)), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, vocab: int, dim: int, n_layer: int, n_head: int, ffn: int, n_ctx: int, eps: float = 1e-5):
        super().__init__()
        self.n_head, self.n_ctx, self.eps = n_head, n_ctx, eps
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, n_head, ffn, eps) for _ in range(n_layer))
        self.norm = RMSNorm(dim, eps)
        self.output = nn.Linear(dim, vocab, bias=False)
        cos, sin = rope_tables(dim // n_head, n_ctx)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # Residual projections scaled down with depth (GPT-2's rule) keep early training stable.
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("o.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        return self.output(self.norm(x))

    def gguf_tensors(self) -> dict[str, np.ndarray]:
        f16 = lambda p: p.detach().to(torch.float16).numpy()  # noqa: E731
        f32 = lambda p: p.detach().float().numpy()  # noqa: E731 - norms stay f32, as llama.cpp's files have them
        out = {"token_embd.weight": f16(self.embed.weight)}
        for i, b in enumerate(self.blocks):
            out.update({
                f"blk.{i}.attn_norm.weight": f32(b.attn_norm.weight),
                f"blk.{i}.attn_q.weight": f16(b.q.weight), f"blk.{i}.attn_k.weight": f16(b.k.weight),
                f"blk.{i}.attn_v.weight": f16(b.v.weight), f"blk.{i}.attn_output.weight": f16(b.o.weight),
                f"blk.{i}.ffn_norm.weight": f32(b.ffn_norm.weight),
                f"blk.{i}.ffn_gate.weight": f16(b.gate.weight), f"blk.{i}.ffn_up.weight": f16(b.up.weight),
                f"blk.{i}.ffn_down.weight": f16(b.down.weight),
            })
        out["output_norm.weight"] = f32(self.norm.weight)
        out["output.weight"] = f16(self.output.weight)
        return out


# --- training ---------------------------------------------------------------------------------

def batches(stream: np.ndarray, n_ctx: int, batch: int, rng: np.random.Generator):
    """Random windows, each led by BOS as a prompt is at inference, so a prompt can start anywhere."""
    while True:
        starts = rng.integers(0, len(stream) - n_ctx, size=batch)
        windows = np.stack([stream[s:s + n_ctx] for s in starts])
        inputs = np.concatenate([np.full((batch, 1), BOS), windows[:, :-1]], axis=1)
        yield torch.from_numpy(inputs), torch.from_numpy(windows)


def eval_windows(stream: np.ndarray, n_ctx: int):
    """Every held-out token once, in consecutive windows led by BOS."""
    n = (len(stream) // n_ctx) * n_ctx
    windows = stream[:n].reshape(-1, n_ctx)
    inputs = np.concatenate([np.full((len(windows), 1), BOS), windows[:, :-1]], axis=1)
    return torch.from_numpy(inputs), torch.from_numpy(windows)


@torch.no_grad()
def mean_loss(model, inputs, targets, batch: int = 64) -> float:
    total, count = 0.0, 0
    for i in range(0, len(inputs), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs[i:i + batch])
        total += F.cross_entropy(logits.float().flatten(0, 1), targets[i:i + batch].flatten(), reduction="sum").item()
        count += targets[i:i + batch].numel()
    return total / count


def unigram_loss(train: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    """Cross-entropy of held-out tokens under train-set token frequencies (add-one smoothed)."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout].mean())


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def greedy(model, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation in float32, and each step's top-1 minus top-2 logit."""
    ids, out, margins = list(prompt_ids), [], []
    for _ in range(n):
        logits = model(torch.tensor([ids[-model.n_ctx:]]))[0, -1].float()
        top = torch.topk(logits, 2)
        token = int(top.indices[0])
        out.append(token)
        margins.append(round(float(top.values[0] - top.values[1]), 4))
        if token == EOS:
            break
        ids.append(token)
    return out, margins


def streamed_text(sp: spm.SentencePieceProcessor, ids: list[int]) -> str:
    """The text a client sees for ``ids`` after a prompt: pieces as bytes, no space stripped."""
    out = bytearray()
    for i in ids:
        if sp.is_byte(i):
            out.append(int(sp.id_to_piece(i)[3:5], 16))
        elif not sp.is_control(i):
            out += sp.id_to_piece(i).replace("\u2581", " ").encode()
    return out.decode(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=704)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--space-split", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    t0 = time.monotonic()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    files = corpus()
    train_texts = [t for rel, t in files if not held_out(rel)]
    heldout_texts = [t for rel, t in files if held_out(rel)]
    args.out.mkdir(parents=True, exist_ok=True)
    sp = train_tokenizer(train_texts, args.vocab, args.out)
    train = token_stream(sp, train_texts, args.space_split, args.seed)
    heldout = token_stream(sp, heldout_texts)
    corpus_bytes = sum(len(t.encode()) for t in train_texts)
    print(f"corpus: {len(files)} files, train {len(train):,} tokens ({corpus_bytes / len(train):.2f} bytes/token), "
          f"held-out {len(heldout):,} tokens; tokenizer {time.monotonic() - t0:.0f} s", flush=True)

    model = Llama(args.vocab, args.dim, args.layers, args.heads, args.ffn, args.ctx)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=False)
    rng = np.random.default_rng(args.seed)
    eval_inputs, eval_targets = eval_windows(heldout, args.ctx)
    probe = slice(0, min(len(eval_inputs), 32))  # a fixed slice for the curve; the full set at the end
    curve = {"step": [], "train": [], "heldout": []}
    t_train, running = time.monotonic(), []
    for step, (x, y) in zip(range(args.steps), batches(train, args.ctx, args.batch, rng)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            held = mean_loss(model, eval_inputs[probe], eval_targets[probe])
            model.train()
            curve["step"].append(step + 1)
            curve["train"].append(float(np.mean(running)))
            curve["heldout"].append(held)
            elapsed = time.monotonic() - t_train
            print(f"step {step + 1:5d}  train {np.mean(running):.3f}  held-out {held:.3f}  "
                  f"{(step + 1) * args.batch * args.ctx / elapsed:,.0f} tok/s  {elapsed / 60:.1f} min", flush=True)
            running = []
    train_minutes = (time.monotonic() - t_train) / 60

    # The reference is the model as exported: weights rounded to f16 and back, run in f32.
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.to(torch.float16).float())
    heldout_loss = mean_loss(model, eval_inputs, eval_targets)
    unigram = unigram_loss(train, heldout, args.vocab)
    reference = {"prompts": [], "tokenization": []}
    for prompt in PROMPTS:
        prompt_ids = [BOS] + sp.encode(prompt)
        ids, margins = greedy(model, prompt_ids, 32)
        prefixes = [streamed_text(sp, ids[:k]) for k in range(len(ids) + 1)]
        reference["prompts"].append({"prompt": prompt, "prompt_ids": prompt_ids, "greedy_ids": ids,
                                     "margins": margins, "text_prefixes": prefixes})
        print(f"--- {prompt!r}\n{prompt}{prefixes[-1]}", flush=True)
    for text in heldout_texts[:3]:
        sample = text[:600]
        reference["tokenization"].append({"text": sample, "ids": sp.encode(sample)})

    write_llama_gguf(args.out / "demo.gguf", name="inferq-demo-stdlib", n_ctx=args.ctx, n_head=args.heads,
                     n_head_kv=args.heads, vocab=gguf_vocabulary(sp), tensors=model.gguf_tensors())
    (args.out / "demo-reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    figures = {
        "command": "python models/train_demo.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "python": platform.python_version(), "torch": torch.__version__, "sentencepiece": spm.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "files": len(files), "heldout_files": len(heldout_texts),
        "train_tokens": int(len(train)), "heldout_tokens": int(len(heldout)),
        "tokens_seen": args.steps * args.batch * args.ctx, "parameters": n_params,
        "train_minutes": round(train_minutes, 1), "total_minutes": round((time.monotonic() - t0) / 60, 1),
        "heldout_loss": round(heldout_loss, 4), "heldout_perplexity": round(math.exp(heldout_loss), 2),
        "unigram_loss": round(unigram, 4), "unigram_perplexity": round(math.exp(unigram), 2),
        "curve": curve,
    }
    (args.out / "demo-training.json").write_text(json.dumps(figures, indent=1) + "\n")
    plot(curve, unigram, heldout_loss, args.out / "demo-loss.png")
    print(f"held-out loss {heldout_loss:.3f} (perplexity {math.exp(heldout_loss):.1f}); unigram baseline "
          f"{unigram:.3f} ({math.exp(unigram):.1f}); trained {train_minutes:.1f} min, "
          f"{figures['total_minutes']} min in all", flush=True)


def plot(curve: dict, unigram: float, final: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(curve["step"], curve["train"], label="train (mean over the last interval)")
    ax.plot(curve["step"], curve["heldout"], label="held-out (fixed probe windows)")
    ax.axhline(unigram, color="grey", linestyle="--", label=f"unigram baseline ({unigram:.2f})")
    ax.axhline(final, color="green", linestyle=":", label=f"final held-out, all windows ({final:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per token (nats)")
    ax.set_title("inferq demo model: a tiny Llama on the Python standard library")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
