"""Which backend serves a GGUF file: ``--backend auto`` reads the header and decides.

ctransformers (last release 2023-09) bundles a llama.cpp from before most of
today's GGUF files: it reads ``llama`` (Mistral files say ``llama`` too) and
``falcon`` with their own tokenizers and the quantizations of that time, not
Llama 3's BPE tokenizer, Qwen 2, Phi 3, Gemma or the IQ/BF16 types.
llama-cpp-python reads all of those and, measured on an H100 with the same
1.1B F16 file, decodes ~3x faster (490 vs 151 tokens/s), so ``auto`` prefers
it whenever it is installed.
"""
from __future__ import annotations

from dataclasses import dataclass

from worker.backends.base import ModelLoadError
from worker.gguf_meta import GGUFInfo

# architecture -> the tokenizer model ctransformers' llama.cpp reads for it
CTRANSFORMERS_ARCHS = {"llama": "llama", "falcon": "gpt2"}
CTRANSFORMERS_TYPES = frozenset({"F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1",
                                 "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"})
INSTALL_HINT = {"llama-cpp": "pip install 'inferq[llama]'", "ctransformers": "pip install ctransformers"}


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


def ctransformers_refusal(info: GGUFInfo) -> str | None:
    """Why ctransformers cannot serve this file, or None if it can."""
    tokenizer = CTRANSFORMERS_ARCHS.get(info.architecture)
    if tokenizer is None:
        return f"architecture {info.architecture!r} is newer than ctransformers"
    if info.tokenizer_model != tokenizer:
        return f"{info.architecture} with a {info.tokenizer_model!r} tokenizer is newer than ctransformers"
    newer = sorted(info.tensor_types - CTRANSFORMERS_TYPES)
    if newer:
        return f"tensor types {', '.join(newer)} are newer than ctransformers"
    return None


MODULES = {"ctransformers": "ctransformers", "llama-cpp": "llama_cpp"}


def is_installed(backend: str) -> bool:
    """Whether the backend's module imports (a broken install counts as absent). Asked only of a backend
    that might serve the file: importing ctransformers brings in huggingface_hub, half a second of a
    llama-cpp worker's start."""
    try:
        __import__(MODULES[backend])
    except ImportError:
        return False
    return True


def installed() -> set[str]:
    return {name for name in MODULES if is_installed(name)}


def choose(info: GGUFInfo, requested: str = "auto", available: set[str] | None = None) -> Choice:
    has = is_installed if available is None else available.__contains__
    refusal = ctransformers_refusal(info)
    if requested != "auto":
        if requested not in INSTALL_HINT:
            raise ModelLoadError(f"unknown backend {requested!r}; choose auto, ctransformers or llama-cpp")
        if not has(requested):
            raise ModelLoadError(f"backend {requested} is not installed: {INSTALL_HINT[requested]}")
        if requested == "ctransformers" and refusal:
            raise ModelLoadError(f"ctransformers cannot serve this file ({refusal}); use --backend llama-cpp")
        return Choice(requested, "requested with --backend")
    if has("llama-cpp"):
        why = f"only llama-cpp can serve it ({refusal})" if refusal else \
            "llama-cpp is installed and decodes faster than ctransformers"
        return Choice("llama-cpp", why)
    if refusal is None and has("ctransformers"):
        return Choice("ctransformers", f"{info.architecture} file; llama-cpp is not installed")
    raise ModelLoadError(f"no installed backend can serve this file: {refusal}; "
                         f"install the llama extra: {INSTALL_HINT['llama-cpp']}")
