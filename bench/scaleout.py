"""Aggregate tokens/s with 1 and 2 workers on the same queue, under enough concurrent jobs to keep them busy.

    python -m bench.scaleout --jobs 16 --max-tokens 64 --model small

Each worker decodes with one thread, so on this 2-core machine two workers
can use both cores; the ratio shows how much of that the queue delivers. The
default model spends ~8 ms per token: with a faster one the API, Redis and the
benchmark's own clients take the second core and there is nothing to gain.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from bench.harness import model_file, save, stack
from inferq.client import Client


def run(url: str, jobs: int, max_tokens: int) -> tuple[float, int]:
    client = Client(url, timeout=30)

    def one(i):
        job = client.submit(f"{i} scale out", model="scale", max_tokens=max_tokens, temperature=0)["job_id"]
        return list(client.events(job))[-1].get("tokens_out", 0)

    start = time.monotonic()
    with ThreadPoolExecutor(jobs) as pool:
        tokens = sum(pool.map(one, range(jobs)))
    return time.monotonic() - start, tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", choices=["tiny", "slow", "small"], default="small")
    args = ap.parse_args(argv)
    path = model_file(args.model)
    rows = []
    for workers in (1, 2):
        with stack({"scale": path}, threads=1, workers_per_model=workers) as (url, _):
            run(url, 2, 8)  # warm-up
            seconds, tokens = run(url, args.jobs, args.max_tokens)
        rows.append((workers, seconds, tokens, tokens / seconds))
    print(f"scale-out: model={args.model} jobs={args.jobs} max_tokens={args.max_tokens}, 1 thread per worker")
    print(f"{'workers':>8}{'seconds':>10}{'tokens':>10}{'tokens/s':>10}")
    for workers, seconds, tokens, rate in rows:
        print(f"{workers:8d}{seconds:10.2f}{tokens:10d}{rate:10.1f}")
    print(f"ratio 2 workers / 1 worker aggregate tokens/s: {rows[1][3] / rows[0][3]:.2f}")
    save("scaleout", {"model": args.model, "rows": [{"workers": w, "seconds": s, "tokens": t, "rate": r}
                                                    for w, s, t, r in rows]})


if __name__ == "__main__":
    main()
