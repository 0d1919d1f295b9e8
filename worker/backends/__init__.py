"""Model backends behind one protocol (see ``base.Backend``)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from worker.backends.base import Backend, LoadOptions, ModelLoadError

BACKENDS = ("ctransformers", "llama-cpp")
# Without --ctx-size a worker uses the file's trained context, capped here: a
# 128k-token KV cache would take far more memory than most hosts have.
DEFAULT_MAX_CTX = 4096
# Jobs a batching worker decodes together unless --parallel says otherwise. A GPU
# has room (and idle compute) for more; on a CPU the decode step slows with each
# sequence, so past a few the first token waits longer for little more throughput.
DEFAULT_PARALLEL_CPU = 4
DEFAULT_PARALLEL_GPU = 8


def check_model_file(path: str) -> None:
    """Fail with one clear line before a C library sees a bad file."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"not a GGUF file (bad magic {magic!r}): {path}")


def load_backend(name: str, path: str, options: LoadOptions) -> Backend:
    from worker.gguf_meta import read_info

    check_model_file(path)
    from worker.backends.selection import choose

    info = read_info(path)  # refuses damaged files before a C library mmaps them
    choice = choose(info, name)
    if not options.ctx_size:
        options = replace(options, ctx_size=min(info.context_length or 512, DEFAULT_MAX_CTX))
    if choice.backend == "ctransformers":
        if options.parallel > 1:
            raise ModelLoadError(f"ctransformers decodes one job at a time and cannot serve --parallel "
                                 f"{options.parallel}: use --backend llama-cpp, or --parallel 1")
        options = replace(options, parallel=1)
    elif options.parallel <= 0:
        options = replace(options, parallel=DEFAULT_PARALLEL_GPU if options.gpu_layers else DEFAULT_PARALLEL_CPU)
    if choice.backend == "llama-cpp":
        from worker.backends.llama_cpp_backend import LlamaCppBackend

        backend: Backend = LlamaCppBackend(path, options, info)
    else:
        from worker.backends.ctransformers_backend import CTransformersBackend

        backend = CTransformersBackend(path, options)
    backend.info = info
    backend.reason = choice.reason
    return backend


__all__ = ["Backend", "LoadOptions", "ModelLoadError", "load_backend", "check_model_file", "BACKENDS"]
