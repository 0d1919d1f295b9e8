"""Soak: thousands of jobs across several workers, with random cancels and client reconnects.

    python -m bench.soak --jobs 2000 --workers 2 --clients 16

Each job's stream is read by a client that drops its connection at random
points and resumes with Last-Event-ID; some jobs are cancelled. At the end
every job is checked: one terminal event, gap-free seqs, no token seen twice,
and the streamed text equal to the stored result. Prints submitted, finished,
cancelled, failed, lost (must be 0) and duplicated tokens (must be 0).
"""
from __future__ import annotations

import argparse
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from bench.harness import model_file, stack
from inferq.client import Client, parse_sse


def read_with_drops(url: str, job_id: str, rng: random.Random) -> tuple[list[dict], int]:
    """Read the whole stream, hanging up at random and resuming from the last seq seen."""
    events, drops, last = [], 0, None
    session = requests.Session()
    while True:
        headers = {} if last is None else {"Last-Event-ID": str(last)}
        drop_after = rng.choice([None, None, 1, 3, 8])
        with session.get(f"{url}/v1/jobs/{job_id}/stream", headers=headers, stream=True, timeout=60) as resp:
            n = 0
            for frame in parse_sse(resp.iter_lines(chunk_size=None)):
                event = json.loads(frame["data"])
                events.append(event)
                last = event["seq"]
                if event["type"] in ("end", "error"):
                    return events, drops
                n += 1
                if drop_after is not None and n >= drop_after:
                    drops += 1
                    break


def run_one(url: str, index: int, cancel_rate: float, seed: int) -> dict:
    rng = random.Random(seed * 100_003 + index)
    client = Client(url, timeout=30)
    job_id = client.submit(f"soak {index}", model="soak", max_tokens=rng.randint(4, 64),
                           temperature=0.8, seed=index)["job_id"]
    cancel = rng.random() < cancel_rate
    if cancel:
        threading.Timer(rng.uniform(0, 0.05), lambda: _cancel(client, job_id)).start()
    events, drops = read_with_drops(url, job_id, rng)
    seqs = [e["seq"] for e in events]
    token_seqs = [e["seq"] for e in events if e["type"] == "token"]
    terminal = [e for e in events if e["type"] in ("end", "error")]
    text = "".join(e["t"] for e in events if e["type"] == "token")
    status = client.status(job_id)
    stored = (status.get("result") or {}).get("text")
    return {"job": job_id, "drops": drops, "gaps": seqs != list(range(len(seqs))),
            "dup_tokens": len(token_seqs) - len(set(token_seqs)), "terminals": len(terminal),
            "kind": terminal[-1]["type"] if terminal else None,
            "cancelled": bool(terminal) and terminal[-1].get("stop_reason") == "cancelled",
            "text_ok": terminal[-1]["type"] != "end" or (terminal[-1]["text"] == text == stored)}


def _cancel(client: Client, job_id: str) -> None:
    try:
        client.cancel(job_id)
    except Exception:  # already finished: the race is part of the test
        pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--cancel-rate", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    path = model_file("tiny")
    start = time.monotonic()
    with stack({"soak": path}, threads=1, workers_per_model=args.workers) as (url, _):
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(lambda i: run_one(url, i, args.cancel_rate, args.seed), range(args.jobs)))
    elapsed = time.monotonic() - start
    lost = sum(1 for r in results if r["terminals"] != 1 or r["gaps"])
    dup = sum(r["dup_tokens"] for r in results)
    finished = sum(1 for r in results if r["kind"] == "end" and not r["cancelled"])
    cancelled = sum(1 for r in results if r["cancelled"])
    failed = sum(1 for r in results if r["kind"] == "error")
    bad_text = sum(1 for r in results if not r["text_ok"])
    print(f"soak: {args.jobs} jobs, {args.workers} workers, {args.clients} clients, {elapsed:.1f} s "
          f"({args.jobs / elapsed:.1f} jobs/s)")
    print(f"submitted {len(results)}  finished {finished}  cancelled {cancelled}  failed {failed}  "
          f"reconnects {sum(r['drops'] for r in results)}")
    print(f"text mismatches {bad_text}")
    print(f"lost {lost}  duplicated tokens {dup}")


if __name__ == "__main__":
    main()
