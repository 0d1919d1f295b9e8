"""Decode speed of both backends on the same GGUF file and prompt, in the same run.

    python -m bench.backends --model small --tokens 64 --runs 3

Greedy decoding with the shared token loop pieces (DirectDecoder + our
sampler), so the only difference is the engine. Prints tokens/s per backend
(min/median over runs), prompt evaluation time, and the ratio.
"""
from __future__ import annotations

import argparse
import statistics

from bench.harness import greedy_stamps, model_file, save, ttft_and_rate
from worker.backends import LoadOptions, load_backend
from worker.backends.selection import installed

PROMPT = "def fibonacci(n): return the data model of the queue worker " * 4


def measure(name: str, path, threads: int, tokens: int, runs: int) -> dict:
    backend = load_backend(name, str(path), LoadOptions(threads=threads))
    rates, prompt_ms = [], []
    for run in range(runs):
        prompt = backend.tokenize(f"{run} {PROMPT}")  # no cached prefix between runs
        first_ms, rate = ttft_and_rate(*greedy_stamps(backend, prompt, tokens))
        prompt_ms.append(first_ms)
        rates.append(rate)
    backend.close()
    return {"rates": rates, "prompt_ms": prompt_ms, "prompt_tokens": len(prompt)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "slow", "small"], default="small")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0: the worker's default (cores - 1)")
    args = ap.parse_args(argv)
    path = model_file(args.model)
    threads = LoadOptions(threads=args.threads).resolved_threads
    results = {name: measure(name, path, threads, args.tokens, args.runs)
               for name in ("ctransformers", "llama-cpp") if name in installed()}
    print(f"backends: model={args.model} file={path.stat().st_size / 1e6:.1f}MB threads={threads} "
          f"tokens={args.tokens} runs={args.runs} prompt={next(iter(results.values()))['prompt_tokens']} tokens")
    print(f"{'backend':16}{'decode tok/s min':>18}{'median':>10}{'prompt ms median':>18}")
    for name, r in results.items():
        print(f"{name:16}{min(r['rates']):18.1f}{statistics.median(r['rates']):10.1f}"
              f"{statistics.median(r['prompt_ms']):18.1f}")
    if len(results) == 2:
        ratio = statistics.median(results["llama-cpp"]["rates"]) / statistics.median(results["ctransformers"]["rates"])
        print(f"ratio llama-cpp/ctransformers decode tokens/s (median): {ratio:.2f}")
    save(f"backends-{args.model}", {"threads": threads, "results": results})


if __name__ == "__main__":
    main()
