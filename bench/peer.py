"""Peer: llama-cpp-python's OpenAI server against inferq's OpenAI endpoint, same GGUF, same prompts.

    python -m bench.peer --model small --runs 5 --max-tokens 64

Both serve ``POST /v1/completions`` with ``stream: true`` and decode with
llama.cpp on the same number of threads per model copy. Single client:
decode tokens/s and time to first token. Four concurrent clients: aggregate
tokens/s, for the peer (one model, requests served one after another) and
for inferq with 1 and with 2 workers. A token is a streamed chunk with text.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import requests

from bench.harness import OUT, model_file, save, stack, stamped_frames, summary, ttft_and_rate
from inferq.embedded_redis import free_port

PROMPT = "def fibonacci(n): return the data model of the queue worker"


@contextmanager
def llama_cpp_server(path, threads: int, n_ctx: int = 2048):
    port = free_port()
    log = (OUT / "llama_cpp_server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                             "--n_ctx", str(n_ctx)], stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited; see {log.name} (pip install 'llama-cpp-python[server]')")
            try:
                if requests.get(url + "/v1/models", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            raise RuntimeError("llama_cpp.server did not come up")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def complete(session: requests.Session, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, list]:
    """One streamed completion: (start time, arrival time of each chunk that carried text)."""
    start = time.perf_counter()
    stamps = []
    with session.post(f"{url}/v1/completions", stream=True, timeout=300,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "stream": True}) as resp:
        resp.raise_for_status()
        for read_at, frame in stamped_frames(resp):
            if frame["data"] == "[DONE]":
                break
            choices = json.loads(frame["data"]).get("choices") or [{}]
            if choices[0].get("text"):
                stamps.append(read_at)
    return start, stamps


def single(url: str, model: str, runs: int, max_tokens: int, offset: int) -> dict:
    rates, ttfts, counts = [], [], []
    with requests.Session() as s:
        for run in range(runs):
            # A fresh first word per run: no prompt-cache reuse on either side.
            start, stamps = complete(s, url, model, f"{offset + run} {PROMPT}", max_tokens)
            ttft, rate = ttft_and_rate(start, stamps)
            ttfts.append(ttft)
            rates.append(rate)
            counts.append(len(stamps))
    return {"rates": rates, "ttfts": ttfts, "tokens": counts}


def concurrent(url: str, model: str, clients: int, per_client: int, max_tokens: int, offset: int) -> float:
    """Aggregate tokens/s of ``clients`` threads each running ``per_client`` completions back to back."""
    totals = []

    def client(c: int) -> None:
        n = 0
        with requests.Session() as s:
            for run in range(per_client):
                n += len(complete(s, url, model, f"{offset + c * 100 + run} {PROMPT}", max_tokens)[1])
        totals.append(n)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(totals) / (time.perf_counter() - start)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "slow", "small"], default="small")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per model copy, both sides")
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args(argv)
    path = model_file(args.model)
    rows = {}
    with llama_cpp_server(path, args.threads) as url:
        complete(requests.Session(), url, "peer", "warm up", 4)
        rows["llama_cpp.server"] = single(url, "peer", args.runs, args.max_tokens, 0)
        rows["llama_cpp.server"]["agg"] = {1: concurrent(url, "peer", args.clients, 2, args.max_tokens, 1000)}
    for workers in (1, 2):
        with stack({"peer": path}, threads=args.threads, workers_per_model=workers,
                   worker_args=("--backend", "llama-cpp")) as (url, _):
            complete(requests.Session(), url, "peer", "warm up", 4)
            if workers == 1:
                rows["inferq"] = single(url, "peer", args.runs, args.max_tokens, 0)
                rows["inferq"]["agg"] = {}
            rows["inferq"]["agg"][workers] = concurrent(url, "peer", args.clients, 2, args.max_tokens, 1000)

    print(f"peer: model={args.model} ({path.stat().st_size / 1e6:.0f} MB), {args.threads} llama.cpp thread(s) "
          f"per model copy, {args.runs} runs x {args.max_tokens} tokens, /v1/completions streamed")
    for name, r in rows.items():
        print(f"{name:>17}  decode tok/s {summary(r['rates'])}   TTFT ms {summary(r['ttfts'])}   "
              f"tokens {statistics.median(r['tokens']):.0f}")
    peer_agg, ours = rows["llama_cpp.server"]["agg"][1], rows["inferq"]["agg"]
    print(f"{args.clients} concurrent clients, aggregate tok/s: llama_cpp.server {peer_agg:.1f}; "
          f"inferq 1 worker {ours[1]:.1f}, 2 workers {ours[2]:.1f}")
    single_ratio = statistics.median(rows["inferq"]["rates"]) / statistics.median(rows["llama_cpp.server"]["rates"])
    ttft_diff = statistics.median(rows["inferq"]["ttfts"]) - statistics.median(rows["llama_cpp.server"]["ttfts"])
    print(f"single-stream decode inferq/llama_cpp.server {single_ratio:.2f}; TTFT inferq-peer {ttft_diff:+.1f} ms p50;"
          f" {args.clients}-client aggregate inferq(2 workers)/llama_cpp.server {ours[2] / peer_agg:.2f}")
    save("peer", {"model": args.model, "threads": args.threads, "clients": args.clients, "rows": rows})


if __name__ == "__main__":
    main()
