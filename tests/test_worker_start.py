"""What a worker's start is spared, and that the vocabulary pass run beside the context is the same pass."""
import subprocess
import sys

import pytest

from inferq.testmodel import make_chat_gguf, make_llama_gguf
from tests.helpers import skip_without_llama_cpp
from worker.backends.base import ModelLoadError

_ATTR_UNKNOWN, _ATTR_CONTROL = 1 << 0, 1 << 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("start")
    return {"tiny": make_llama_gguf(d / "tiny.gguf", "tiny"), "gemma": make_chat_gguf(d / "gemma.gguf", "gemma"),
            "mistral": make_chat_gguf(d / "mistral.gguf", "mistral")}


def test_a_llama_cpp_load_imports_neither_ctransformers_nor_the_gguf_package(files):
    """ctransformers' import brings in huggingface_hub (half a second), gguf's package its writer, yaml and
    sentencepiece: a llama-cpp worker needs neither. A fresh interpreter, so nothing is imported already."""
    skip_without_llama_cpp()
    code = ("import sys; from worker.backends import LoadOptions, load_backend; "
            "[load_backend(name, sys.argv[1], LoadOptions(threads=1, parallel=1, ctx_size=64)).close() "
            " for name in ('llama-cpp', 'auto')]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ctransformers', 'gguf', 'huggingface_hub')))")
    out = subprocess.run([sys.executable, "-c", code, str(files["tiny"])], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_vocabulary_read_beside_the_context_is_every_control_token(files):
    """The pass runs on its own thread while llama.cpp makes the context: asked again here, token by token on
    this thread, the engine gives the same control tokens and texts."""
    skip_without_llama_cpp()
    from worker.backends import LoadOptions, load_backend

    for name, path in files.items():
        backend = load_backend("llama-cpp", str(path), LoadOptions(threads=1, parallel=2, ctx_size=64))
        try:
            lib, vocab = backend._lib, backend._vocab
            expected = {}
            for token in range(backend.vocab_size):
                if lib.llama_vocab_get_attr(vocab, token) & (_ATTR_CONTROL | _ATTR_UNKNOWN):
                    text = backend._piece(token, special=True)
                    if text:
                        expected.setdefault(text.decode("utf-8", errors="replace"), token)
            assert backend.special_tokens == expected, name
            assert backend.bos_text == backend._piece(backend.bos_token_id, special=True).decode(), name
        finally:
            backend.close()


def test_a_context_llama_cpp_cannot_make_is_a_load_error_after_the_pass_ends(files):
    """The pass reads the model's vocabulary: the model is freed only once it is done, never under it."""
    skip_without_llama_cpp()
    from worker.backends import LoadOptions, load_backend

    for _ in range(3):
        with pytest.raises(ModelLoadError, match="n_seq_max"):  # llama.cpp allows 256 sequences at most
            load_backend("llama-cpp", str(files["gemma"]), LoadOptions(threads=1, parallel=300, ctx_size=64))
