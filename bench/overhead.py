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

from bench.harness import greedy_stamps, model_file, save, stack, stamped_frames, summary, ttft_and_rate
from worker.backends import LoadOptions, load_backend

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
        start, stamps = greedy_stamps(backend, backend.tokenize(prompt(run)), max_tokens)
        ttft, rate = ttft_and_rate(start, stamps)
        ttfts.append(ttft)
        rates.append(rate)
        counts.append(len(stamps))
    backend.close()
    return rates, ttfts, counts


PHASES = ("POST /v1/jobs answered", "accepted -> worker started it", "started -> first token made",
          "first token made -> client has it")


def through_api(url: str, model: str, max_tokens: int, runs: int, first_run: int = 0):
    """Rates, TTFTs and token counts through the API, and where each TTFT went (PHASES, ms per run).

    The phases come from the events' own ``ts`` (ms, same clock: one machine).
    """
    rates, ttfts, counts, phases = [], [], [], []
    session = requests.Session()
    for run in range(first_run, first_run + runs):
        start_wall, start = time.time() * 1000, time.perf_counter()
        job = session.post(f"{url}/v1/jobs", json={"operation": "infer", "model": model, "prompt": prompt(run),
                                                  "max_tokens": max_tokens, "temperature": 0}).json()["job_id"]
        posted = time.time() * 1000
        stamps, tokens_out, ts = [], 0, {}
        with session.get(f"{url}/v1/jobs/{job}/stream", stream=True) as resp:
            for read_at, frame in stamped_frames(resp):
                if frame["event"] == "token":
                    stamps.append(read_at)
                    if "token" not in ts:
                        ts["token"], ts["received"] = json.loads(frame["data"])["ts"], time.time() * 1000
                elif frame["event"] in ("queued", "started"):
                    ts[frame["event"]] = json.loads(frame["data"])["ts"]
                elif frame["event"] == "end":
                    tokens_out = json.loads(frame["data"])["tokens_out"]
                    break
        ttft, rate = ttft_and_rate(start, stamps, tokens_out)
        ttfts.append(ttft)
        rates.append(rate)
        counts.append(tokens_out)
        phases.append([posted - start_wall, ts["started"] - ts["queued"], ts["token"] - ts["started"],
                       ts["received"] - ts["token"]])
    return rates, ttfts, counts, phases


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
        p_rate, p_ttft, p_n, phases = through_api(url, args.model, args.max_tokens, args.runs)
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
    print(f"where the path's TTFT goes (p50 over runs, ms; event ts has 1 ms steps); direct TTFT p50 "
          f"{statistics.median(d_ttft):.1f}:")
    for i, phase in enumerate(PHASES):
        print(f"    {phase:36}{statistics.median(p[i] for p in phases):8.1f}")
    print(f"ratio path/direct decode tokens/s (median): {ratio:.3f}")
    save(f"overhead-{args.model}", {"backend": direct.backend, "direct_rates": d_rate, "path_rates": p_rate,
                                    "direct_ttft_ms": d_ttft, "path_ttft_ms": p_ttft, "added_ttft_ms": added,
                                    "phases_ms": dict(zip(PHASES, map(list, zip(*phases)))),
                                    "ratio": ratio})


if __name__ == "__main__":
    main()
