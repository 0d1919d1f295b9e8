"""What one Redis core carries for a fleet: N workers on one Redis, Redis CPU per token and per job.

    python -m bench.scaleout --workers 1 2 4 --model small --parallel 8 --clients 32 --rounds 2 --tokens 64

For each N, a fresh stack (Redis, N workers of one model with ``--parallel``, one gunicorn API process):
the idle Redis CPU rate of that stack (heartbeats, renewals, the reaper: it grows with N) measured for a
few seconds, then the load of ``bench.redis_cost`` — clients submitting to ``POST /v1/jobs`` and streaming
``/v1/jobs/<id>/stream`` — and then 1-token jobs one after another for the per-job cost. Redis CPU is
INFO's ``used_cpu_sys + used_cpu_user`` delta less that idle rate; commands are commandstats' calls.

The ceiling is what follows from the per-token cost: one Redis core carries 1e6 / (µs per token) tok/s
for the whole fleet, which at 1,000 tok/s per GPU worker is that many workers. The point is that the cost
per token does not grow with N. Each worker decodes with one llama.cpp thread; on a 2-core machine 4
workers are CPU-starved, so the fleet's measured tok/s does not scale here, and need not.

Keep ``--clients`` at least ``--parallel`` x the largest N (the default, 32, is 8 x 4): with fewer, each
worker's batch holds fewer jobs at large N, a decode step's one script call is shared by fewer tokens,
and the cost per token rises for that reason rather than for the number of workers.

The baseline, on the same Redis in the same run for each N, is ``bench.redis_cost``'s floor: one XADD
of a token event per token, pipelined. The ratio inferq / floor is printed per N.

``--events cluster`` runs each N again with the job logs on a 3-master Redis Cluster with a replica each
(``INFERQ_EVENTS_URL``; inferq/local_cluster.py, on the same machine): the queue's Redis is metered as
before, and the cluster's six nodes, summed, over the same stretches: what moved off the queue's primary.
"""
from __future__ import annotations

import argparse
import contextlib

import redis

from bench.harness import model_file, save, stack
from bench.redis_cost import phases
from inferq.local_cluster import RedisCluster

GPU_WORKER_TOK_S = 1000


def measure(path, workers: int, args, events: str = "queue") -> dict:
    env = {"INFERQ_MAX_STREAMS_PER_TOKEN": "100000"}  # every client shares one address: let the load decide
    with contextlib.ExitStack() as stacks:
        nodes = None
        if events == "cluster":
            cluster = stacks.enter_context(RedisCluster())
            env["INFERQ_EVENTS_URL"] = cluster.url
            nodes = [node.client for node in cluster.nodes]
        url, redis_url = stacks.enter_context(stack({"scale": path}, threads=1, workers_per_model=workers,
                                                    worker_args=("--parallel", str(args.parallel)), env_extra=env))
        tokens, per_token, per_job, base, meter = phases(url, redis.Redis.from_url(redis_url), "scale", args.clients,
                                                         args.rounds, args.tokens, args.jobs, args.idle_s, nodes)
    cpu_us = per_token["cpu_s"] / tokens * 1e6
    moved = {}
    if meter.also is not None:
        load_, jobs_ = meter.also
        moved = {"events_cpu_us_per_token": load_["cpu_s"] / tokens * 1e6,
                 "events_calls_per_token": load_["calls"] / tokens,
                 "events_job_cpu_us": jobs_["cpu_s"] / args.jobs * 1e6, "events_job_calls": jobs_["calls"] / args.jobs}
    return {"events": events, **moved, "workers": workers, "tokens": tokens, "jobs": args.clients * args.rounds,
            "seconds": per_token["seconds"], "rate": tokens / per_token["seconds"],
            "idle_cpu_ms_per_s": meter.idle_cpu_per_s * 1e3, "idle_calls_per_s": meter.idle_calls_per_s,
            "cpu_us_per_token": cpu_us, "calls_per_token": per_token["calls"] / tokens,
            "cmd_us_per_token": sum(u for _, u in per_token["by_command"].values()) / tokens,
            "cpu_us_per_token_all": per_token["cpu_s_all"] / tokens * 1e6,
            "load_cpu_us_per_job": per_token["cpu_s"] / (args.clients * args.rounds) * 1e6,
            "job_cpu_us": per_job["cpu_s"] / args.jobs * 1e6, "job_calls": per_job["calls"] / args.jobs,
            "floor_cpu_us_per_token": base["cpu_us_per_token"], "floor_calls_per_token": base["calls_per_token"],
            "ceiling_tok_s": 1e6 / cpu_us, "floor_ceiling_tok_s": 1e6 / base["cpu_us_per_token"],
            "by_command_per_token": {k: [n / tokens, u / tokens] for k, (n, u) in per_token["by_command"].items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--model", choices=["tiny", "slow", "small"], default="small")
    ap.add_argument("--parallel", type=int, default=8, help="jobs each worker decodes together")
    ap.add_argument("--clients", type=int, default=32,
                    help="concurrent streaming clients; at least parallel x workers keeps every worker's batch full")
    ap.add_argument("--rounds", type=int, default=2, help="jobs each client submits, one after another")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per job")
    ap.add_argument("--jobs", type=int, default=20, help="1-token jobs for the per-job cost")
    ap.add_argument("--idle-s", type=float, default=4.0)
    ap.add_argument("--events", nargs="+", choices=["queue", "cluster"], default=["queue"],
                    help="where the job logs live: the queue's Redis, and/or a 3-master events cluster")
    args = ap.parse_args(argv)
    path = model_file(args.model)
    rows = [measure(path, n, args, "queue") for n in args.workers] if "queue" in args.events else []
    moved = [measure(path, n, args, "cluster") for n in args.workers] if "cluster" in args.events else []
    if not rows:
        rows = moved
    print(f"scale-out: model={args.model}, 1 thread and --parallel {args.parallel} per worker, "
          f"{args.clients} clients x {args.rounds} jobs of max_tokens {args.tokens}, one Redis, one API process")
    print(f"{'workers':>7}{'tokens':>7}{'tok/s':>7}{'idle ms/s':>10}{'µs/tok':>8}{'cmd µs':>8}{'cmd/tok':>8}"
          f"{'floor µs':>9}{'x floor':>8}{'job µs':>8}{'job cmd':>8}{'tok/s/core':>11}{'GPU wkrs':>9}")
    for w in rows:
        print(f"{w['workers']:7d}{w['tokens']:7d}{w['rate']:7.0f}{w['idle_cpu_ms_per_s']:10.2f}"
              f"{w['cpu_us_per_token']:8.1f}{w['cmd_us_per_token']:8.1f}{w['calls_per_token']:8.2f}{w['floor_cpu_us_per_token']:9.1f}"
              f"{w['cpu_us_per_token'] / w['floor_cpu_us_per_token']:8.1f}{w['job_cpu_us']:8.0f}"
              f"{w['job_calls']:8.0f}{w['ceiling_tok_s']:11,.0f}{w['ceiling_tok_s'] / GPU_WORKER_TOK_S:9.1f}")
    print("  µs/tok: Redis CPU per token over the load, less the idle rate; cmd µs: the commands' own time by "
          "commandstats (no event loop, no socket I/O); floor: one XADD per token, pipelined, same Redis")
    print("  job µs / job cmd: one 1-token job, submit to its stream's end; "
          f"tok/s/core = 1e6 / µs/tok; GPU wkrs = that / {GPU_WORKER_TOK_S:,} tok/s each")
    top = sorted(rows[0]["by_command_per_token"], key=lambda k: -rows[0]["by_command_per_token"][k][1])[:6]
    print("  where the per-token commands go, per N (calls per token / µs per token by commandstats):")
    print(f"    {'workers':>7}" + "".join(f"{name:>16}" for name in top))
    for w in rows:
        cells = (w["by_command_per_token"].get(name, [0.0, 0.0]) for name in top)
        print(f"    {w['workers']:7d}" + "".join(f"{n:8.2f}/{u:7.1f}" for n, u in cells))
    first, last = rows[0], rows[-1]
    if len(rows) > 1:
        print(f"  {last['workers']} vs {first['workers']} worker(s): Redis CPU per token "
              f"{last['cpu_us_per_token'] / first['cpu_us_per_token']:.2f}x, commands per token "
              f"{last['calls_per_token'] / first['calls_per_token']:.2f}x, fleet tok/s "
              f"{last['rate'] / first['rate']:.2f}x")
    if moved:
        print("  job logs on a 3-master events cluster (INFERQ_EVENTS_URL), same load, per N: the queue's Redis "
              "and the cluster's six nodes summed")
        print(f"    {'workers':>7}{'queue µs/tok':>13}{'cmd/tok':>8}{'job µs':>8}{'job cmd':>8}{'tok/s/core':>11}"
              f"{'cluster µs/tok':>15}{'cmd/tok':>8}{'job µs':>8}{'job cmd':>8}")
        for w in moved:
            print(f"    {w['workers']:7d}{w['cpu_us_per_token']:13.1f}{w['calls_per_token']:8.2f}{w['job_cpu_us']:8.0f}"
                  f"{w['job_calls']:8.0f}{w['ceiling_tok_s']:11,.0f}{w['events_cpu_us_per_token']:15.1f}"
                  f"{w['events_calls_per_token']:8.2f}{w['events_job_cpu_us']:8.0f}{w['events_job_calls']:8.0f}")
        if rows is not moved:
            for q, c in zip(rows, moved):
                print(f"  {q['workers']} worker(s): the queue's Redis CPU per token {q['cpu_us_per_token']:.1f} -> "
                      f"{c['cpu_us_per_token']:.1f} µs ({c['cpu_us_per_token'] / q['cpu_us_per_token']:.2f}x) with "
                      "the logs moved off it")
    save("scaleout", {"model": args.model, "parallel": args.parallel, "clients": args.clients,
                      "rounds": args.rounds, "max_tokens": args.tokens, "gpu_worker_tok_s": GPU_WORKER_TOK_S,
                      "rows": rows, "events_cluster_rows": moved if rows is not moved else []})


if __name__ == "__main__":
    main()
