"""What a GGUF file says about itself, read without loading the weights."""
from __future__ import annotations

from dataclasses import dataclass

from worker.backends.base import ModelLoadError


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    tokenizer_model: str
    chat_template: str | None
    context_length: int
    file_type: int | None
    tensor_types: frozenset[str] = frozenset()  # e.g. {"F32", "Q4_0"}


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    part = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0] if len(part) else None


def read_info(path: str) -> GGUFInfo:
    """Read and check the header; ModelLoadError for a damaged or truncated file.

    Backends mmap the file, so a truncated one would load and then crash when
    a tensor past the end is touched: check every tensor's extent first.
    """
    import os

    import gguf

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError/struct errors on damaged files
        raise ModelLoadError(f"damaged or truncated GGUF file {path}: {exc}") from None
    size = os.path.getsize(path)
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ModelLoadError(f"truncated GGUF file {path}: tensor {tensor.name} ends past the end of the file")
    arch = _field(reader, "general.architecture") or "unknown"
    return GGUFInfo(
        architecture=arch,
        tokenizer_model=_field(reader, "tokenizer.ggml.model") or "unknown",
        chat_template=_field(reader, "tokenizer.chat_template"),
        context_length=int(_field(reader, f"{arch}.context_length") or 0),
        file_type=_field(reader, "general.file_type"),
        tensor_types=frozenset(t.tensor_type.name for t in reader.tensors),
    )
