"""Continuous batching: aggregate tokens/s and TTFT at 1-16 concurrent clients, against the same engine.

    python -m bench.batching --model small --slots 8 --threads 2

Every client streams ``--per-client`` completions of ``--max-tokens`` tokens
at temperature 0 through ``POST /v1/completions``, back to back; a token is a
streamed chunk with text. Measured in the same run, on the same file and
thread count:

- ``engine``: the same engine (llama-cpp-python's C API, as the worker loads
  it) decoding the same number of sequences together in-process, one
  ``llama_decode`` per step — the ceiling on this machine;
- ``llama-server``: llama.cpp's own server with ``-np`` = slots, ``-kvu``,
  built from the llama.cpp that llama-cpp-python vendors (bench/llama_server.py);
- ``inferq`` with ``--parallel`` = slots, and with ``--parallel 1``.

Also: Redis commands and Redis CPU per generated token (INFO deltas over the
8-client run) and what that implies for one Redis primary, and TTFT for a
1,000-token shared prefix, first job vs second.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import redis
import requests

from bench.harness import model_file, pct, save, stack
from bench.llama_server import llama_server
from bench.peer import complete
from worker.backends import LoadOptions, load_backend
from worker.backends.base import Chunk, SamplingParams

PROMPT = "def fibonacci(n): return the data model of the queue worker"
CLIENTS = (1, 2, 4, 8, 16)


def run_clients(url: str, model: str, clients: int, per_client: int, max_tokens: int, offset: int) -> dict:
    """``clients`` threads, each streaming ``per_client`` completions back to back."""
    ttfts, counts = [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        with requests.Session() as s:
            for run in range(per_client):
                start, stamps = complete(s, url, model, f"{offset + c * 100 + run} {PROMPT}", max_tokens)
                with lock:
                    counts.append(len(stamps))
                    if stamps:
                        ttfts.append((stamps[0] - start) * 1000)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {"tokens": sum(counts), "seconds": seconds, "rate": sum(counts) / seconds,
            "ttft_p50": statistics.median(ttfts), "ttft_p99": pct(ttfts, 0.99)}


def engine(path, threads: int, sequences: int, max_tokens: int, rounds: int, offset: int) -> dict:
    """The same engine decoding ``sequences`` greedy sequences together, ``rounds`` times: tokens/s."""
    backend = load_backend("llama-cpp", str(path), LoadOptions(threads=threads, parallel=sequences))
    tokens, seconds, ttfts = 0, 0.0, []
    for r in range(rounds):
        prompts = [backend.tokenize(f"{offset + s * 100 + r} {PROMPT}") for s in range(sequences)]
        samplers = [backend.sampler(SamplingParams.greedy(1.0), p) for p in prompts]
        for s in range(sequences):
            backend.forget(s, 0)
        start = time.perf_counter()
        picked: list[int] = [0] * sequences
        group: list[Chunk] = []

        def prefill(chunks: list[Chunk]) -> None:
            for chunk, row in zip(chunks, backend.decode(chunks)):  # sample before the next call reuses the rows
                picked[chunk.slot] = samplers[chunk.slot].sample(row)

        for s, p in enumerate(prompts):  # prompts together, as many as one decode call takes
            if group and sum(len(c.tokens) for c in group) + len(p) > backend.options.batch_size:
                prefill(group)
                group = []
            group.append(Chunk(s, p, 0, True))
        prefill(group)
        ttfts.append((time.perf_counter() - start) * 1000)
        pos = [len(p) for p in prompts]
        tokens += sequences
        for _ in range(max_tokens - 1):
            rows = backend.decode([Chunk(s, [t], pos[s], True) for s, t in enumerate(picked)])
            pos = [p + 1 for p in pos]
            picked = [samplers[s].sample(rows[s]) for s in range(sequences)]
            tokens += sequences
        seconds += time.perf_counter() - start
        for sampler in samplers:
            sampler.close()
    backend.close()
    return {"tokens": tokens, "seconds": seconds, "rate": tokens / seconds, "ttft_p50": statistics.median(ttfts)}


def redis_cost(redis_url: str, url: str, model: str, per_client: int, max_tokens: int) -> dict:
    """Redis commands and CPU seconds per generated token at 8 clients."""
    r = redis.Redis.from_url(redis_url)

    def sample():
        info = r.info()
        return info["total_commands_processed"], info["used_cpu_user"] + info["used_cpu_sys"]

    before = sample()
    run = run_clients(url, model, 8, per_client, max_tokens, 7000)
    after = sample()
    commands, cpu = after[0] - before[0], after[1] - before[1]
    return {"tokens": run["tokens"], "commands": commands, "commands_per_token": commands / run["tokens"],
            "redis_cpu_us_per_token": cpu / run["tokens"] * 1e6,
            "tokens_per_s_per_redis_core": run["tokens"] / cpu if cpu else None}


def shared_prefix(url: str, model: str) -> dict:
    """TTFT of two jobs whose prompts share a ~1,000-token prefix: the second reuses the first's cache."""
    prefix = "the data model of the queue worker " * 40  # 1,000 tokens on the test models' vocabulary
    out = {}
    with requests.Session() as s:
        for name, tail in (("first", " and one"), ("second", " and two")):
            start, stamps = complete(s, url, model, prefix + tail, 4)
            out[name] = (stamps[0] - start) * 1000
    return out


def cancel_latency(url: str, model: str, runs: int = 5) -> dict:
    """Milliseconds from DELETE to the client holding the job's ``end``: while it decodes, and while it
    prefills a ~2,000-token prompt, with another job streaming beside it."""
    from inferq.client import Client

    api = Client(url, timeout=30)
    out: dict[str, list[float]] = {"decode": [], "prefill": []}
    busy = api.submit("busy", model=model, max_tokens=2000, temperature=0, repetition_penalty=1.0)["job_id"]
    for phase in ("decode", "prefill"):
        for run in range(runs):
            prompt = f"{run} busy" if phase == "decode" else f"{run} " + "the data model of the queue worker " * 80
            job = api.submit(prompt, model=model, max_tokens=1000 if phase == "decode" else 8,
                             temperature=0)["job_id"]
            stream = api.events(job)
            for e in stream:
                if (phase == "decode" and e["type"] == "token") or (phase == "prefill" and e["type"] == "narration"):
                    break
            if phase == "prefill":
                time.sleep(0.2)  # well inside the ~1.5 s prefill
            t0 = time.perf_counter()
            api.cancel(job)
            last = list(stream)[-1]
            if last.get("stop_reason") == "cancelled":
                out[phase].append((time.perf_counter() - t0) * 1000)
    api.cancel(busy)
    return {k: {"p50": statistics.median(v), "max": max(v), "n": len(v)} for k, v in out.items() if v}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "slow", "small", "gemma"], default="small")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    args = ap.parse_args(argv)
    path = model_file(args.model)
    rows: dict[str, dict] = {"engine": {}, "llama-server": {}, f"inferq --parallel {args.slots}": {},
                             "inferq --parallel 1": {}}
    for n in args.clients:
        rows["engine"][n] = engine(path, args.threads, n, args.max_tokens, args.per_client, 1000)
    with llama_server(path, args.threads, args.slots) as url:
        complete(requests.Session(), url, "peer", "warm up", 4)
        for n in args.clients:
            rows["llama-server"][n] = run_clients(url, "peer", n, args.per_client, args.max_tokens, 2000)
    extra = {}
    for slots in (args.slots, 1):
        name = f"inferq --parallel {slots}"
        with stack({"peer": path}, threads=args.threads,
                   worker_args=("--backend", "llama-cpp", "--parallel", str(slots))) as (url, redis_url):
            complete(requests.Session(), url, "peer", "warm up", 4)
            for n in args.clients:
                rows[name][n] = run_clients(url, "peer", n, args.per_client, args.max_tokens, 3000)
            if slots == args.slots:
                extra["redis"] = redis_cost(redis_url, url, "peer", args.per_client, args.max_tokens)
                extra["prefix_ttft_ms"] = shared_prefix(url, "peer")
                extra["cancel_ms"] = cancel_latency(url, "peer")

    print(f"batching: model={args.model} ({path.stat().st_size / 1e6:.0f} MB), {args.threads} threads, "
          f"{args.slots} slots, {args.per_client} x {args.max_tokens}-token completions per client")
    print(f"{'':>22}" + "".join(f"{n:>16}" for n in args.clients) + "   (clients: aggregate tok/s, TTFT p50 ms)")
    for name, by_n in rows.items():
        cells = "".join(f"{r['rate']:8.0f} {r['ttft_p50']:6.0f} " for r in by_n.values())
        print(f"{name:>22}  {cells}")
    ours = rows[f"inferq --parallel {args.slots}"]
    if 8 in args.clients:
        print(f"8 clients: inferq/llama-server {ours[8]['rate'] / rows['llama-server'][8]['rate']:.2f} "
              f"(target >= 1.2), TTFT p50 {ours[8]['ttft_p50']:.0f} vs {rows['llama-server'][8]['ttft_p50']:.0f} ms;"
              f" whole path / in-process batched decode {ours[8]['rate'] / rows['engine'][8]['rate']:.2f} "
              f"(target >= 0.85); / --parallel 1 {ours[8]['rate'] / rows['inferq --parallel 1'][8]['rate']:.2f}")
    if 1 in args.clients:
        print(f"single stream: inferq/engine {ours[1]['rate'] / rows['engine'][1]['rate']:.2f} (target >= 0.95)")
    cost = extra["redis"]
    print(f"Redis: {cost['commands_per_token']:.2f} commands and {cost['redis_cpu_us_per_token']:.1f} us of Redis "
          f"CPU per generated token: one Redis core carries ~{cost['tokens_per_s_per_redis_core']:.0f} tokens/s")
    print(f"1,000-token shared prefix: TTFT first {extra['prefix_ttft_ms']['first']:.0f} ms, "
          f"second {extra['prefix_ttft_ms']['second']:.0f} ms")
    print("cancel, DELETE to end at the client (ms): " + "; ".join(
        f"{k} p50 {v['p50']:.0f} max {v['max']:.0f} ({v['n']} runs)" for k, v in extra["cancel_ms"].items()))
    save("batching", {"model": args.model, "threads": args.threads, "slots": args.slots,
                      "per_client": args.per_client, "max_tokens": args.max_tokens, "rows": rows, **extra})


if __name__ == "__main__":
    main()
