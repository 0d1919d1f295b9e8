"""Overhead of the queue: the same decode directly in-process vs through API -> Redis -> worker -> SSE.

    python -m bench.overhead --model tiny --runs 10
    python -m bench.overhead --model small --runs 5

Both sides decode the same greedy continuation of the same prompt with the
same backend and thread count, so they produce identical tokens. Decode rate
is (tokens - 1) / (last token time - first token time); TTFT is from the call
(direct) or the POST (path) to the first token.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import requests

from bench.harness import model_file, stack, summary
from inferq.client import parse_sse
from worker.backends import LoadOptions, load_backend
from worker.sampling import Sampler

PROMPT = "def fibonacci(n): return the data model of the queue worker"


def prompt(run: int) -> str:
    # A different first word per run: neither side can reuse a cached prompt prefix.
    return f"{run} {PROMPT}"


def direct(path, threads: int, max_tokens: int, runs: int):
    # "auto", as the worker does: both sides must run the same engine.
    backend = load_backend("auto", str(path), LoadOptions(threads=threads))
    direct.backend = backend.name
    rates, ttfts, counts = [], [], []
    for run in range(runs):
        tokens = backend.tokenize(prompt(run))
        start = time.perf_counter()
        stamps = []
        for _token in backend.generate(tokens, Sampler(temperature=0)):
            stamps.append(time.perf_counter())
            if len(stamps) == max_tokens:
                break
        ttfts.append((stamps[0] - start) * 1000)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        counts.append(len(stamps))
    backend.close()
    return rates, ttfts, counts


def through_api(url: str, model: str, max_tokens: int, runs: int, first_run: int = 0):
    rates, ttfts, counts = [], [], []
    session = requests.Session()
    for run in range(first_run, first_run + runs):
        start = time.perf_counter()
        job = session.post(f"{url}/v1/jobs", json={"operation": "infer", "model": model, "prompt": prompt(run),
                                                  "max_tokens": max_tokens, "temperature": 0}).json()["job_id"]
        stamps, tokens_out = [], 0
        with session.get(f"{url}/v1/jobs/{job}/stream", stream=True) as resp:
            for frame in parse_sse(resp.iter_lines(chunk_size=None)):
                if frame["event"] == "token":
                    stamps.append(time.perf_counter())
                elif frame["event"] == "end":
                    tokens_out = json.loads(frame["data"])["tokens_out"]
                    break
        ttfts.append((stamps[0] - start) * 1000)
        rates.append((tokens_out - 1) / (stamps[-1] - stamps[0]))
        counts.append(tokens_out)
    return rates, ttfts, counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "slow", "small"], default="tiny")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="0: the worker's default (cores - 1)")
    args = ap.parse_args(argv)
    path = model_file(args.model)

    d_rate, d_ttft, d_n = direct(path, args.threads, args.max_tokens, args.runs)
    with stack({args.model: path}, args.threads) as (url, _):
        through_api(url, args.model, 4, 1, first_run=-1)  # warm-up (own prompt): connections, first-job costs
        p_rate, p_ttft, p_n = through_api(url, args.model, args.max_tokens, args.runs)
    assert d_n == p_n, f"token counts differ: direct {d_n} vs path {p_n}"
    added = [p - d for p, d in zip(sorted(p_ttft), sorted(d_ttft))]
    ratio = statistics.median(p_rate) / statistics.median(d_rate)
    print(f"overhead: model={args.model} backend={direct.backend} file={path.stat().st_size / 1e6:.1f}MB "
          f"threads={LoadOptions(threads=args.threads).resolved_threads} "
          f"tokens={d_n[0]} runs={args.runs}")
    print(f"{'':24}{'tokens/s':>44}   {'TTFT ms':>44}")
    print(f"{'direct (in-process)':24}{summary(d_rate)}   {summary(d_ttft)}")
    print(f"{'API->Redis->worker->SSE':24}{summary(p_rate)}   {summary(p_ttft)}")
    print(f"TTFT added by the path: p50 {statistics.median(added):.2f} ms, max {max(added):.2f} ms")
    print(f"ratio path/direct decode tokens/s (median): {ratio:.3f}")


if __name__ == "__main__":
    main()
