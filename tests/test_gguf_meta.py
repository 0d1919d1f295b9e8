"""The worker's own GGUF header walk says what gguf's GGUFReader says, and refuses every damaged file cleanly."""
import struct
import time
from pathlib import Path

import gguf
import numpy as np
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


# --- files damaged or made to be refused, one way each ------------------------------------------------------

def write_gguf(path, edit=lambda w: None, tensors=None, alignment=None, endian=gguf.GGUFEndian.LITTLE) -> Path:
    """A small real GGUF file written by gguf's own writer, ``edit`` adding or replacing its fields."""
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_context_length(128)
    w.add_token_list(["<unk>", "a", "bb", "ccc"])
    edit(w)
    for name, array in (tensors or {"w": np.ones((4, 64), np.float32)}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def retyped(key, add):
    def edit(w):
        w.kv_data[0].pop(key, None)
        add(w)
    return edit


def tensor_info(path, index=0) -> dict[str, int]:
    """Where tensor ``index``'s info fields lie in the file (gguf's reader finds the entry)."""
    at = gguf.GGUFReader(path, "r").tensors[index].field.offset
    raw = Path(path).read_bytes()
    n_dims_at = at + 8 + struct.unpack_from("<Q", raw, at)[0]
    type_at = n_dims_at + 4 + 8 * struct.unpack_from("<I", raw, n_dims_at)[0]
    return {"name": at, "n_dims": n_dims_at, "dims": n_dims_at + 4, "type": type_at, "offset": type_at + 4}


def patched(raw: bytes, at: int, fmt: str, value) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def vocabulary_at(path) -> int:
    """Where the first token's length lies: after the key, the array's type, its strings' type, its count."""
    key = "tokenizer.ggml.tokens"
    return gguf.GGUFReader(path, "r").fields[key].offset + 8 + len(key) + 4 + 4 + 8


DAMAGE = {
    # name: (what the message says, a function of (the file's path, its bytes) giving the damaged bytes). The
    # vocabulary is "<unk>", "a", "bb", "ccc": 43 bytes with their lengths.
    "empty file": ("empty", lambda p, raw: b""),
    "header cut inside the magic": ("past the end|bad magic", lambda p, raw: raw[:3]),
    "header cut inside the counts": ("past the end", lambda p, raw: raw[:20]),
    "bad magic": ("bad magic", lambda p, raw: b"GGML" + raw[4:]),
    "version 1": ("version 1 ", lambda p, raw: patched(raw, 4, "<I", 1)),
    "version 4": ("version 4 ", lambda p, raw: patched(raw, 4, "<I", 4)),
    "absurd tensor count": ("tensors cannot fit", lambda p, raw: patched(raw, 8, "<Q", 2**63 - 1)),
    "absurd key/value count": ("key/value pairs cannot fit", lambda p, raw: patched(raw, 16, "<Q", 2**63 - 1)),
    "absurd key length": ("past the end", lambda p, raw: patched(raw, 24, "<Q", 2**62)),
    "absurd vocabulary count": ("strings cannot fit", lambda p, raw: patched(raw, vocabulary_at(p) - 8, "<Q", 2**40)),
    "absurd token length": ("string array runs past", lambda p, raw: patched(raw, vocabulary_at(p), "<Q", 2**62)),
    "unknown value type": ("unknown value type", lambda p, raw: patched(raw, 24 + 8 + len("general.architecture"),
                                                                        "<I", 77)),
    "cut inside the vocabulary": ("string array runs past", lambda p, raw: raw[:vocabulary_at(p) + 43 - 2]),
    "cut inside the tensor-info table": ("past the end", lambda p, raw: raw[:tensor_info(p, 1)["type"] + 2]),
    "five dimensions": ("5 dimensions", lambda p, raw: patched(raw, tensor_info(p)["n_dims"], "<I", 5)),
    "absurd dimension": ("elements", lambda p, raw: patched(raw, tensor_info(p)["dims"], "<Q", 2**63)),
    "unknown tensor type": ("unknown type 999", lambda p, raw: patched(raw, tensor_info(p)["type"], "<I", 999)),
    "rows not whole blocks": ("not whole blocks", lambda p, raw: patched(
        raw, tensor_info(p)["type"], "<I", int(gguf.GGMLQuantizationType.Q4_K))),
    "unaligned tensor offset": ("not a multiple of 32", lambda p, raw: patched(
        raw, tensor_info(p, 1)["offset"], "<Q", struct.unpack_from("<Q", raw, tensor_info(p, 1)["offset"])[0] + 4)),
    "tensor data past the end": ("ends past the end", lambda p, raw: patched(raw, tensor_info(p)["offset"], "<Q", 2**40)),
    "last tensor cut one byte short": ("ends past the end", lambda p, raw: raw[:-1]),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_each_kind_of_damage_is_refused_by_name_before_any_engine_sees_it(damage, tmp_path):
    source = write_gguf(tmp_path / "good.gguf", tensors={"a": np.ones((4, 64), np.float32),
                                                          "b": np.ones(64, np.float32)})
    assert read_info(str(source)).longest_token == 5  # "<unk>": the file reads before it is damaged
    expected, damaged = DAMAGE[damage]
    path = tmp_path / "damaged.gguf"
    path.write_bytes(damaged(str(source), source.read_bytes()))
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match=expected):
        read_info(str(path))
    assert time.monotonic() - t0 < 1.0  # an absurd count is refused at once, not walked


MADE_TO_BE_REFUSED = {
    "big-endian file": ("big-endian", {"endian": gguf.GGUFEndian.BIG}),
    "alignment not a power of two": ("not a power of two", {"edit": lambda w: w.add_uint32("general.alignment", 48)}),
    "array of arrays": ("array of arrays", {"edit": lambda w: w.add_array("x.nested", [[1, 2], [3]])}),
    "architecture not a string": ("general.architecture is a int", {
        "edit": retyped("general.architecture", lambda w: w.add_uint32("general.architecture", 7))}),
    "context length not an integer": ("llama.context_length is a str", {
        "edit": retyped("llama.context_length", lambda w: w.add_string("llama.context_length", "long"))}),
}


@pytest.mark.parametrize("case", MADE_TO_BE_REFUSED)
def test_files_llama_cpp_refuses_are_refused_here(case, tmp_path):
    expected, how = MADE_TO_BE_REFUSED[case]
    path = write_gguf(tmp_path / "refused.gguf", **how)
    with pytest.raises(ModelLoadError, match=expected):
        read_info(str(path))


def test_a_custom_alignment_and_arrays_of_every_kind_read_as_gguf_reader_reads_them(tmp_path):
    def edit(w):
        w.add_array("x.floats", [1.5, 2.5, 3.5])
        w.add_array("x.flags", [True, False])
        w.add_array("x.empty_strings", [])
        w.add_chat_template("{{ messages }}")
        w.add_file_type(1)

    path = write_gguf(tmp_path / "aligned.gguf", edit, alignment=64,
                      tensors={"a": np.ones((3, 64), np.float16), "b": np.ones(5, np.float32)})
    assert read_info(str(path)) == reference(str(path))


def test_a_chat_template_that_is_no_string_is_no_template_as_llama_cpp_has_it(tmp_path):
    path = write_gguf(tmp_path / "odd.gguf", lambda w: w.add_float32("tokenizer.chat_template", 1.5))
    assert read_info(str(path)).chat_template is None


def test_a_262k_vocabulary_is_read_in_a_fraction_of_a_second(tmp_path):
    """Gemma 3's vocabulary size: gguf's reader takes many seconds over it, the walk tens of milliseconds."""
    path = write_gguf(tmp_path / "big-vocab.gguf", lambda w: w.kv_data[0].pop("tokenizer.ggml.tokens") and
                      w.add_token_list([f"tok{i}" for i in range(262_144)]))
    t0 = time.monotonic()
    info = read_info(str(path))
    assert time.monotonic() - t0 < 1.0
    assert info.longest_token == len("tok262143")
