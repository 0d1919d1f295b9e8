"""What a GGUF file says about itself, read without loading the weights.

A worker reads a handful of scalars and every tensor's extent before llama.cpp maps the file. gguf's own
``GGUFReader`` builds every field, the whole vocabulary element by element in Python: 15 s for a 262k
vocabulary, where llama.cpp loads the same file in under one. So the header is walked here, in the
format's own layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), skipping the arrays it
does not need; the type names and block sizes are gguf's constants.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass

from worker.backends.base import ModelLoadError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
TOKENS = "tokenizer.ggml.tokens"
WANTED = ("general.architecture", "general.file_type", "general.alignment", "tokenizer.ggml.model",
          "tokenizer.chat_template", TOKENS)


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


class _Damaged(Exception):
    pass


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

    def unpack(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.skip(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        n = self.unpack("<Q")
        start = self.skip(n)
        return self.buf[start:start + n]

    def skip_strings(self, count: int) -> int:
        """Jump over ``count`` strings; the longest one's length. A vocabulary is one such array: 262k
        entries, each only a length to jump over."""
        buf, at, size, unpack, longest = self.buf, self.at, self.size, struct.unpack_from, 0
        for _ in range(count):
            if at + 8 > size:
                raise _Damaged("a string array runs past the end of the file")
            n = unpack("<Q", buf, at)[0]
            longest = n if n > longest else longest
            at += 8 + n
        if at > size:
            raise _Damaged("a string array runs past the end of the file")
        self.at = at
        return longest


def _value_reader():
    from gguf.constants import GGUFValueType as T

    scalars = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
               T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}

    def kind_of(raw: int):
        try:
            return T(raw)
        except ValueError:
            raise _Damaged(f"unknown value type {raw}") from None

    def read(h: _Header, kind, keep: bool):
        """The value (or None when not ``keep``), the cursor moved past it. A kept array of strings: the
        longest one's length."""
        if kind in scalars:
            value = h.unpack(scalars[kind])
            return value if keep else None
        if kind == T.STRING:
            raw = h.string()
            return raw.decode("utf-8", errors="replace") if keep else None
        inner, count = kind_of(h.unpack("<I")), h.unpack("<Q")
        if inner in scalars:
            h.skip(count * struct.calcsize(scalars[inner]))
        elif inner == T.STRING:
            longest = h.skip_strings(count)
            return longest if keep else None
        else:  # arrays of arrays: none in today's files, walked anyway
            for _ in range(count):
                read(h, inner, False)
        return None

    return lambda h, raw, keep: read(h, kind_of(raw), keep)


def _walk(buf) -> tuple[dict, list[tuple[str, int, int, int]], int]:
    """The wanted scalars, each tensor as (name, type, data offset, element count), and where data begins."""
    h = _Header(buf)
    if buf[h.skip(4):4] != MAGIC:
        raise _Damaged("not a GGUF file (bad magic)")
    version = h.unpack("<I")
    if version < 2:
        raise _Damaged(f"GGUF version {version} is not supported")
    n_tensors, n_fields = h.unpack("<Q"), h.unpack("<Q")
    read = _value_reader()
    fields = {}
    for _ in range(n_fields):
        key = h.string().decode("utf-8", errors="replace")
        keep = key in WANTED or key.endswith(".context_length")
        value = read(h, h.unpack("<I"), keep)
        if keep:
            fields[key] = value
    tensors = []
    for _ in range(n_tensors):
        name = h.string().decode("utf-8", errors="replace")
        dims = [h.unpack("<Q") for _ in range(h.unpack("<I"))]
        kind, offset = h.unpack("<I"), h.unpack("<Q")
        tensors.append((name, kind, offset, math.prod(dims)))
    align = fields.get("general.alignment") or DEFAULT_ALIGNMENT
    start = -(-h.at // align) * align
    return fields, tensors, start


def read_info(path: str) -> GGUFInfo:
    """Read and check the header; ModelLoadError for a damaged or truncated file.

    Backends mmap the file, so a truncated one would load and then crash when
    a tensor past the end is touched: check every tensor's extent first.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            size = len(buf)
            fields, tensors, start = _walk(buf)
    except (_Damaged, ValueError, OSError, struct.error) as exc:
        raise ModelLoadError(f"damaged or truncated GGUF file {path}: {exc}") from None
    types = set()
    for name, kind, offset, elements in tensors:
        try:
            qtype = GGMLQuantizationType(kind)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelLoadError(f"damaged GGUF file {path}: tensor {name} has unknown type {kind}") from None
        types.add(qtype.name)
        if start + offset + elements // block * type_size > size:
            raise ModelLoadError(f"truncated GGUF file {path}: tensor {name} ends past the end of the file")
    arch = fields.get("general.architecture") or "unknown"
    longest = fields.get(TOKENS)
    return GGUFInfo(
        architecture=arch,
        tokenizer_model=fields.get("tokenizer.ggml.model") or "unknown",
        chat_template=fields.get("tokenizer.chat_template"),
        context_length=int(fields.get(f"{arch}.context_length") or 0),
        file_type=fields.get("general.file_type"),
        tensor_types=frozenset(types),
        longest_token=longest if isinstance(longest, int) else 0,
    )
