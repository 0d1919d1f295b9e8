"""What a GGUF file says about itself, read without loading the weights.

A worker reads a handful of scalars and every tensor's extent before llama.cpp maps the file. gguf's own
``GGUFReader`` builds every field, the whole vocabulary element by element in Python: 15 s for a 262k
vocabulary, where llama.cpp loads the same file in under one. So the header is walked here, in the
format's own layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), skipping the arrays it
does not need; the type names and block sizes are gguf's constants.

Refused, as llama.cpp's own gguf loader refuses them or would read past the end of its mapping: a bad
magic or version, a count or length the rest of the file cannot hold, a value of unknown type or an array
of arrays, a wanted key of the wrong type, an alignment that is not a power of two, a tensor of more than
four dimensions, of unknown type, not a whole number of blocks a row, at an unaligned offset, or whose
data ends past the end of the file.
"""
from __future__ import annotations

import importlib.util
import math
import mmap
import os
import struct
import sys
from dataclasses import dataclass

from worker.backends.base import ModelLoadError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
TOKENS = "tokenizer.ggml.tokens"
STRINGS = ("general.architecture", "tokenizer.ggml.model")
TEMPLATE = "tokenizer.chat_template"  # llama.cpp refuses no type here; a non-string is taken as no template
INTEGERS = ("general.file_type", "general.alignment")
# The fewest bytes one entry can take: a key/value (key length, type, one byte) and a tensor's info (name
# length, dimension count, type, offset). A count the rest of the file cannot hold is refused at once.
MIN_FIELD, MIN_TENSOR, MIN_STRING = 8 + 4 + 1, 8 + 4 + 4 + 8, 8
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    tokenizer_model: str
    chat_template: str | None
    context_length: int
    file_type: int | None
    tensor_types: frozenset[str] = frozenset()  # e.g. {"F32", "Q4_0"}
    # The most bytes of any token's text in the vocabulary array (0: none found). No token's piece is longer
    # than its text, so a backend need not ask the engine for 262k pieces to bound a prompt's size.
    longest_token: int = 0


def _gguf_constants():
    """gguf's constants module alone. ``import gguf`` runs the package's __init__, which brings in its reader,
    writer, yaml and sentencepiece: 50 ms of every worker's start, for two tables. This module imports
    nothing of gguf's, so it is loaded from its file, under a private name."""
    name = "worker._gguf_constants"
    module = sys.modules.get(name)
    if module is None:
        package = importlib.util.find_spec("gguf")  # finds, does not import
        if package is None or not package.submodule_search_locations:
            raise ModelLoadError("the gguf package is not installed: pip install gguf")
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(package.submodule_search_locations[0], "constants.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module


class _Damaged(Exception):
    pass


@dataclass(frozen=True)
class _Strings:
    """An array of strings, kept as its longest entry's length."""
    longest: int


class _Header:
    """A cursor over the file's bytes (an mmap) that refuses to read past their end."""

    def __init__(self, buf):
        self.buf, self.at, self.size = buf, 0, len(buf)

    def skip(self, n: int) -> int:
        start = self.at
        if n < 0 or start + n > self.size:
            raise _Damaged(f"the header runs past the end of the file (at byte {start}, {n} more)")
        self.at = start + n
        return start

    def unpack(self, fmt: struct.Struct):
        return fmt.unpack_from(self.buf, self.skip(fmt.size))[0]

    def count(self, what: str, each: int) -> int:
        """A 64-bit count of entries of at least ``each`` bytes, refused when the rest cannot hold them."""
        n = self.unpack(_U64)
        if n * each > self.size - self.at:
            raise _Damaged(f"{n} {what} cannot fit in the {self.size - self.at} bytes left")
        return n

    def string(self) -> bytes:
        n = self.unpack(_U64)
        start = self.skip(n)
        return self.buf[start:start + n]

    def skip_strings(self, count: int) -> int:
        """Jump over ``count`` strings; the longest one's length. A vocabulary is one such array: 262k
        entries, each only a length to jump over (a local loop: 30 ms for 262k)."""
        buf, at, size, unpack, longest = self.buf, self.at, self.size - 8, _U64.unpack_from, 0
        for _ in range(count):
            if at > size:
                raise _Damaged("a string array runs past the end of the file")
            n = unpack(buf, at)[0]
            longest = n if n > longest else longest
            at += 8 + n
        if at > self.size:
            raise _Damaged("a string array runs past the end of the file")
        self.at = at
        return longest


def _value_reader():
    T = _gguf_constants().GGUFValueType

    scalars = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
               T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}
    scalars = {kind: struct.Struct(fmt) for kind, fmt in scalars.items()}

    def kind_of(raw: int):
        try:
            return T(raw)
        except ValueError:
            raise _Damaged(f"unknown value type {raw}") from None

    def read(h: _Header, kind, keep: bool):
        """The value (None when not ``keep``), the cursor moved past it. An array of strings: ``_Strings``;
        any other array: None."""
        if kind in scalars:
            value = h.unpack(scalars[kind])
            return value if keep else None
        if kind == T.STRING:
            raw = h.string()
            return raw.decode("utf-8", errors="replace") if keep else None
        inner = kind_of(h.unpack(_U32))
        if inner in scalars:
            h.skip(h.count("array elements", scalars[inner].size) * scalars[inner].size)
        elif inner == T.STRING:
            longest = h.skip_strings(h.count("strings", MIN_STRING))
            return _Strings(longest) if keep else None
        else:
            raise _Damaged("an array of arrays (llama.cpp reads none)")
        return None

    return lambda h, raw, keep: read(h, kind_of(raw), keep)


def _walk(buf) -> tuple[dict, list[tuple[str, int, int, list[int]]], int]:
    """The wanted fields, each tensor as (name, type, data offset, dimensions), and where data begins."""
    h = _Header(buf)
    if buf[h.skip(4):4] != MAGIC:
        raise _Damaged("not a GGUF file (bad magic)")
    version = h.unpack(_U32)
    if version not in VERSIONS:
        endian = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise _Damaged(f"GGUF version {version} is not supported{endian}")
    n_tensors = h.unpack(_U64)
    n_fields = h.count("key/value pairs", MIN_FIELD)
    read = _value_reader()
    fields = {}
    for _ in range(n_fields):
        key = h.string().decode("utf-8", errors="replace")
        keep = key in STRINGS or key in INTEGERS or key in (TOKENS, TEMPLATE) or key.endswith(".context_length")
        value = read(h, h.unpack(_U32), keep)
        if keep:
            fields[key] = value
    if n_tensors * MIN_TENSOR > h.size - h.at:
        raise _Damaged(f"{n_tensors} tensors cannot fit in the {h.size - h.at} bytes left")
    tensors = []
    for _ in range(n_tensors):
        name = h.string().decode("utf-8", errors="replace")
        n_dims = h.unpack(_U32)
        if n_dims > MAX_DIMS:
            raise _Damaged(f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [h.unpack(_U64) for _ in range(n_dims)]
        kind, offset = h.unpack(_U32), h.unpack(_U64)
        tensors.append((name, kind, offset, dims))
    align = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _Damaged(f"general.alignment {align!r} is not a power of two")
    fields["general.alignment"] = align
    return fields, tensors, -(-h.at // align) * align


def _typed(fields: dict, arch: str) -> None:
    """A wanted key of the wrong type is a damaged file: llama.cpp refuses it, and our reading would be
    nonsense."""
    for key in (*STRINGS, *INTEGERS, f"{arch}.context_length"):
        value = fields.get(key)
        want = str if key in STRINGS else int
        if value is not None and (not isinstance(value, want) or isinstance(value, bool)):
            raise _Damaged(f"{key} is a {type(value).__name__}, not a {want.__name__}")


def _tensor_types(tensors, start: int, align: int, size: int) -> set[str]:
    """Each tensor's type name; refused: an unknown type, a shape llama.cpp refuses, data past the end."""
    constants = _gguf_constants()
    GGMLQuantizationType, GGML_QUANT_SIZES = constants.GGMLQuantizationType, constants.GGML_QUANT_SIZES
    types = set()
    for name, kind, offset, dims in tensors:
        try:
            qtype = GGMLQuantizationType(kind)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Damaged(f"tensor {name} has unknown type {kind}") from None
        elements = math.prod(dims)
        if elements >= 1 << 63 or any(d >= 1 << 63 for d in dims):  # int64 in llama.cpp
            raise _Damaged(f"tensor {name} has {elements} elements")
        if dims and dims[0] % block:
            raise _Damaged(f"tensor {name}'s rows of {dims[0]} are not whole blocks of {block} ({qtype.name})")
        if offset % align:
            raise _Damaged(f"tensor {name}'s data offset {offset} is not a multiple of {align}")
        if start + offset + elements // block * type_size > size:
            raise _Damaged(f"tensor {name} ends past the end of the file (truncated?)")
        types.add(qtype.name)
    return types


def read_info(path: str) -> GGUFInfo:
    """Read and check the header; ModelLoadError for a damaged or truncated file.

    Backends mmap the file, so a truncated one would load and then crash when
    a tensor past the end is touched: check every tensor's extent first.
    """
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            size = len(buf)
            fields, tensors, start = _walk(buf)
        arch = fields.get("general.architecture") or "unknown"
        _typed(fields, arch)
        types = _tensor_types(tensors, start, fields["general.alignment"], size)
    except (_Damaged, ValueError, OSError, struct.error) as exc:
        raise ModelLoadError(f"damaged or truncated GGUF file {path}: {exc}") from None
    tokens = fields.get(TOKENS)
    return GGUFInfo(
        architecture=arch,
        tokenizer_model=fields.get("tokenizer.ggml.model") or "unknown",
        chat_template=template if isinstance(template := fields.get(TEMPLATE), str) else None,
        context_length=fields.get(f"{arch}.context_length") or 0,
        file_type=fields.get("general.file_type"),
        tensor_types=frozenset(types),
        longest_token=tokens.longest if isinstance(tokens, _Strings) else 0,
    )
