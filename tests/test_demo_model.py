"""The shipped demo model: a trained Llama, held to the PyTorch model it was exported from.

``models/demo-reference.json`` is written by ``models/train_demo.py`` from the
PyTorch model with the exported (f16-rounded) weights: its SentencePiece ids
and its greedy continuations. Both GGUF backends must reproduce them.
"""
import json

import gguf
import numpy as np
import pytest

from inferq import demo_model
from tests.conftest import ROOT
from worker.backends import LoadOptions, load_backend
from worker.backends.base import SamplingParams
from worker.backends.direct import DirectDecoder
from worker.backends.selection import installed

REFERENCE = json.loads((ROOT / "models" / "demo-reference.json").read_text())
BACKENDS = ["ctransformers", "llama-cpp"]
# Below this gap between PyTorch's best and second-best logit, ggml's f16
# arithmetic may rightly pick the other token; compare greedy output only up to
# such a step. Measured on this file: both backends' logits are within 0.003 of
# PyTorch's, so 0.01 leaves room without hiding a real difference.
MARGIN = 0.01
EOS = 2


def trusted_length(case: dict) -> int:
    """How many reference tokens a GGUF backend must reproduce exactly."""
    for i, margin in enumerate(case["margins"]):
        if margin < MARGIN:
            return i
    return len(case["greedy_ids"])


def reference_text(prompt: str) -> tuple[str, int]:
    """PyTorch's greedy continuation of ``prompt`` as text, and how many tokens it is."""
    case = next(c for c in REFERENCE["prompts"] if c["prompt"] == prompt)
    n = trusted_length(case)
    return case["text_prefixes"][n], n


def test_the_file_is_small_and_a_llama_with_a_sentencepiece_vocabulary():
    path = demo_model.path()
    assert path == ROOT / "models" / "demo.gguf"
    assert path.stat().st_size <= 20 * 1024 * 1024
    reader = gguf.GGUFReader(str(path))

    def field(name):
        f = reader.fields[name]
        return [f.parts[i] for i in f.data]

    assert bytes(field("general.architecture")[0]) == b"llama"
    assert bytes(field("tokenizer.ggml.model")[0]) == b"llama"
    types = np.concatenate(field("tokenizer.ggml.token_type"))
    scores = np.concatenate(field("tokenizer.ggml.scores"))
    assert (types == 6).sum() == 256  # byte fallback: every byte has a piece
    assert len(np.unique(scores)) > 1000  # real BPE merge ranks, not filler
    assert int(field("llama.context_length")[0][0]) == 512


def test_reference_prompts_are_compared_over_enough_tokens():
    # If the margins were mostly thin, the greedy test below would compare almost nothing.
    assert sum(trusted_length(c) for c in REFERENCE["prompts"]) >= 8 * len(REFERENCE["prompts"])


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    if request.param not in installed():
        pytest.skip(f"{request.param} is not installed")
    b = load_backend(request.param, str(demo_model.path()), LoadOptions(threads=1))
    yield b
    b.close()


def test_backends_tokenize_exactly_as_sentencepiece(backend):
    for case in REFERENCE["prompts"]:
        assert backend.tokenize(case["prompt"]) == case["prompt_ids"], case["prompt"]
    for sample in REFERENCE["tokenization"]:
        assert backend.tokenize(sample["text"], add_bos=False) == sample["ids"]


def test_backends_tokenize_any_source_as_the_sentencepiece_model_does(backend):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(ROOT / "models" / "demo-tokenizer.model"))
    # Text the model never saw: this project's code, tabs, non-ASCII, digits runs.
    texts = [p.read_text()[:3000] for p in sorted(ROOT.glob("*/*.py"))[:25]]
    texts += ["\tx = 'été 漢字 😀'  # 12345678\r\n", "", " ", "a  b   c\n\n\n"]
    for text in texts:
        assert backend.tokenize(text, add_bos=False) == sp.encode(text), text[:80]


@pytest.mark.parametrize("case", REFERENCE["prompts"], ids=lambda c: repr(c["prompt"]))
def test_greedy_continuation_matches_pytorch(backend, case):
    n = trusted_length(case)
    expected = [t for t in case["greedy_ids"][:n] if t != EOS]
    got = []
    # Plain greedy: the reference has no repetition penalty.
    for token in DirectDecoder(backend).generate(case["prompt_ids"], SamplingParams.greedy(repetition_penalty=1.0)):
        if len(got) == len(expected):
            break
        got.append(token)
    assert got == expected
    assert backend.detokenize(got).decode() == case["text_prefixes"][n]
