"""GPUs through NVML (nvidia-ml-py): which exist, and how much memory this process holds on one.

A worker pins its GPU by setting CUDA_VISIBLE_DEVICES before any CUDA
library loads, so one process holds one GPU and sees it as device 0.
"""
from __future__ import annotations

import os
import re

from queue_schema.errors import StartError

_DEVICE = re.compile(r"^(cpu|cuda:(\d+))$")


class GPUError(StartError):
    """The requested device cannot be used; the message is one line for the operator."""


def parse_device(device: str) -> int | None:
    """``cpu`` → None, ``cuda:N`` → N; anything else is an error."""
    match = _DEVICE.match(device)
    if not match:
        raise GPUError(f"--device must be cpu or cuda:N, not {device!r}")
    return None if match.group(2) is None else int(match.group(2))


def _nvml():
    try:
        import pynvml
    except ImportError:
        raise GPUError("GPU support needs NVML: pip install 'inferq[cuda]'") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise GPUError(f"no NVIDIA GPU is visible on this host (NVML: {exc}); use --device cpu") from None
    return pynvml


def count() -> int:
    nvml = _nvml()
    return nvml.nvmlDeviceGetCount()


def pin(device: str) -> int | None:
    """Check ``cuda:N`` exists and make it this process's only GPU; returns N (None for cpu)."""
    index = parse_device(device)
    if index is None:
        return None
    available = count()
    if index >= available:
        raise GPUError(f"{device} does not exist: {available} GPU(s) visible on this host")
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    return index


def process_vram_bytes(index: int | None) -> int:
    """GPU memory this process holds on GPU ``index`` (0 on CPU, or when NVML cannot say)."""
    if index is None:
        return 0
    try:
        nvml = _nvml()
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return int(proc.usedGpuMemory or 0)
    except Exception:  # reporting must never take a worker down
        return 0
    return 0
