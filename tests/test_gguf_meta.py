"""The worker's own GGUF header walk says what gguf's GGUFReader says, and refuses every damaged file cleanly."""
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferq.testmodel import make_chat_gguf, make_llama_gguf
from tests.helpers import skip_without_llama_cpp
from worker.backends.base import ModelLoadError
from worker.gguf_meta import GGUFInfo, read_info

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo.gguf"


def reference(path) -> GGUFInfo:
    """The same facts read with gguf's GGUFReader, which builds every field."""
    reader = gguf.GGUFReader(path, "r")

    def field(key):
        f = reader.fields.get(key)
        if f is None:
            return None
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
        return f.parts[f.data[0]].tolist()[0]

    arch = field("general.architecture") or "unknown"
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    longest = max(len(tokens.parts[i]) for i in tokens.data) if tokens is not None else 0
    return GGUFInfo(arch, field("tokenizer.ggml.model") or "unknown", field("tokenizer.chat_template"),
                    int(field(f"{arch}.context_length") or 0), field("general.file_type"),
                    frozenset(t.tensor_type.name for t in reader.tensors), longest)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-meta")
    return [make_llama_gguf(d / "llama.gguf", "tiny", seed=0),
            make_llama_gguf(d / "qwen2.gguf", "tiny", seed=2, arch="qwen2"),
            make_chat_gguf(d / "chat.gguf", "chatml"), DEMO]


def test_the_header_walk_agrees_with_gguf_reader(files):
    for path in files:
        assert read_info(str(path)) == reference(str(path)), path
    assert read_info(str(files[2])).chat_template  # a string field that is no vocabulary entry


def test_every_truncation_is_refused(files, tmp_path):
    data = files[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    # Inside the header (every few bytes through the vocabulary) and inside the tensors' data.
    for end in [*range(0, 4096, 7), *range(4096, len(data), max(1, len(data) // 200))]:
        cut.write_bytes(data[:end])
        with pytest.raises(ModelLoadError, match="damaged or truncated|truncated"):
            read_info(str(cut))


def test_no_piece_is_longer_than_its_text_so_the_files_longest_bounds_the_prompt_guard(files):
    """The llama.cpp backend takes its longest piece from the file's longest token text instead of asking the
    engine for every piece; that holds only if no piece is longer than its text. Every token of every file."""
    skip_without_llama_cpp()
    from worker.backends import LoadOptions, load_backend

    for path in files:
        backend = load_backend("llama-cpp", str(path), LoadOptions(threads=1, parallel=1, ctx_size=64))
        try:
            texts = reference_texts(str(path))
            pieces = [backend._piece(t, special=True) for t in range(backend.vocab_size)]
            assert all(len(p) <= len(t) for p, t in zip(pieces, texts)), path
            assert max(len(p) for p in pieces) <= backend.longest_piece == read_info(str(path)).longest_token
        finally:
            backend.close()


def reference_texts(path) -> list[bytes]:
    tokens = gguf.GGUFReader(path, "r").fields["tokenizer.ggml.tokens"]
    return [bytes(tokens.parts[i]) for i in tokens.data]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corrupt_bytes_are_a_load_error_or_a_reading_never_a_crash(files, tmp_path, data):
    raw = bytearray(files[0].read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, min(len(raw), 3000) - 1))  # the header, where the lengths and types are
        raw[at] = data.draw(st.integers(0, 255))
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(raw))
    try:
        info = read_info(str(path))
    except ModelLoadError:
        return
    assert isinstance(info, GGUFInfo)
