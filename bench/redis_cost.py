"""What each generated token and each job costs Redis: CPU and commands, and where they go.

    python -m bench.redis_cost --model small --parallel 8 --clients 8 --tokens 300 --rounds 2

The load is the one scale-out is about: one worker with ``--parallel 8``, 8 clients each submitting to
``POST /v1/jobs`` and streaming ``/v1/jobs/<id>/stream`` through one gunicorn API process, until at least
4,000 tokens have been generated. Redis's CPU is INFO's ``used_cpu_sys + used_cpu_user`` delta over the load,
less the idle rate of the same stack (heartbeats, renewals, the reaper) measured just before; commands are
INFO commandstats' calls, which count the commands scripts run as well as the script calls themselves.

The baseline, measured on the same Redis in the same run, is the floor a per-token log pays: one XADD of a
token event, sent by a pipelined client. The ratio says how far above that floor
the queue's whole per-token cost sits.

Then the per-job cost: 1-token jobs one after another (one tenant, an empty queue), commands and CPU each.
"""
from __future__ import annotations

import argparse
import json
import threading
import time

import redis
import requests

from bench.harness import model_file, save, stack
from inferq.client import chunk_lines, parse_sse


def cpu_s(r) -> float:
    """Redis's CPU seconds so far (summed over the nodes, given a list: a cluster's)."""
    if isinstance(r, (list, tuple)):
        return sum(cpu_s(node) for node in r)
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def command_calls(r) -> dict[str, tuple[int, int]]:
    """command -> (calls, µs) since Redis started (summed over the nodes, given a list)."""
    if isinstance(r, (list, tuple)):
        out: dict[str, tuple[int, int]] = {}
        for node in r:
            for name, (calls, usec) in command_calls(node).items():
                before = out.get(name, (0, 0))
                out[name] = (before[0] + calls, before[1] + usec)
        return out
    return {name[len("cmdstat_"):]: (int(v["calls"]), int(v["usec"]))
            for name, v in r.info("commandstats").items()}


class Meter:
    """Redis CPU and commands over a stretch of time, less an idle rate measured beforehand."""

    def __init__(self, r: redis.Redis, idle_s: float):
        self.r = r
        t0, c0, k0 = time.monotonic(), cpu_s(r), command_calls(r)
        time.sleep(idle_s)
        t1, c1, k1 = time.monotonic(), cpu_s(r), command_calls(r)
        # The INFO calls themselves are commands: they are counted in the idle rate too, and cancel out.
        self.idle_cpu_per_s = (c1 - c0) / (t1 - t0)
        self.idle_calls_per_s = (_total(k1) - _total(k0)) / (t1 - t0)

    def start(self) -> None:
        self.t0, self.c0, self.k0 = time.monotonic(), cpu_s(self.r), command_calls(self.r)

    def stop(self) -> dict:
        t1, c1, k1 = time.monotonic(), cpu_s(self.r), command_calls(self.r)
        seconds = t1 - self.t0
        by_command = {name: (calls - self.k0.get(name, (0, 0))[0], usec - self.k0.get(name, (0, 0))[1])
                      for name, (calls, usec) in k1.items()}
        return {"seconds": seconds,
                "cpu_s": (c1 - self.c0) - self.idle_cpu_per_s * seconds,
                "cpu_s_all": c1 - self.c0,
                "calls": (_total(k1) - _total(self.k0)) - self.idle_calls_per_s * seconds,
                "by_command": {k: v for k, v in sorted(by_command.items(), key=lambda kv: -kv[1][1]) if v[0]}}


def _total(calls: dict[str, tuple[int, int]]) -> int:
    return sum(c for c, _ in calls.values())


def stream_job(url: str, model: str, prompt: str, max_tokens: int) -> int:
    """Submit one job and read its stream to the end; the tokens it generated."""
    body = {"operation": "infer", "model": model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "repetition_penalty": 1.0}
    resp = requests.post(f"{url}/v1/jobs", json=body, timeout=30)
    resp.raise_for_status()
    job = resp.json()["job_id"]
    with requests.get(f"{url}/v1/jobs/{job}/stream", stream=True, timeout=120) as s:
        for frame in parse_sse(chunk_lines(s.iter_content(chunk_size=None))):
            if frame.get("event") in ("end", "error"):
                event = json.loads(frame["data"])
                if event["type"] == "error":
                    raise RuntimeError(f"job {job} failed: {event}")
                return int(event["tokens_out"])
    raise RuntimeError(f"job {job}: the stream ended without an end event")


def load(url: str, model: str, clients: int, rounds: int, tokens: int) -> int:
    total, lock, errors = [0], threading.Lock(), []

    def client(i: int):
        try:
            for n in range(rounds):
                got = stream_job(url, model, f"client {i} round {n}: the queue worker", tokens)
                with lock:
                    total[0] += got
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return total[0]


def floor(r: redis.Redis, events: int) -> dict:
    """The per-token floor: one XADD of a token event (as the worker writes it), pipelined 64 at a time."""
    payload = json.dumps({"job_id": "0" * 32, "seq": 123, "ts": 1.7e9, "type": "token", "t": " queue", "i": 99})
    key = "bench:floor"
    before = cpu_s(r)
    pipe = r.pipeline(transaction=False)
    for i in range(events):
        pipe.xadd(key, {"t": "token", "e": payload})
        if i % 64 == 63:
            pipe.execute()
    pipe.execute()
    spent = cpu_s(r) - before
    r.delete(key)
    return {"cpu_us_per_token": spent / events * 1e6, "calls_per_token": 1}


def phases(url: str, r: redis.Redis, model: str, clients: int, rounds: int, max_tokens: int, jobs: int,
           idle_s: float, also=None):
    """The load, then 1-token jobs, each metered against the stack's idle rate, then the floor on the same
    Redis: (tokens, the load's meter reading, the jobs', the floor, the meter). ``also``: another store's
    nodes (the events cluster), metered over the same stretches; their (load, jobs) readings are then
    ``meter.also``."""
    load(url, model, clients, 1, 4)  # warm-up: each worker's first decode, the API's imports
    meters = [Meter(r, idle_s)] if also is None else _side_by_side(r, also, idle_s)
    for m in meters:
        m.start()
    tokens = load(url, model, clients, rounds, max_tokens)
    readings = [m.stop() for m in meters]
    for m in meters:
        m.start()
    for i in range(jobs):
        stream_job(url, model, f"one token {i}", 1)
    per_job = [m.stop() for m in meters]
    meter = meters[0]
    meter.also = (readings[1], per_job[1]) if also is not None else None
    return tokens, readings[0], per_job[0], floor(r, max(tokens, 4000)), meter


def _side_by_side(r, also, idle_s: float) -> list[Meter]:
    """Two meters whose idle rates are measured over the same seconds."""
    import threading

    out = {}
    threads = [threading.Thread(target=lambda k=k, c=c: out.__setitem__(k, Meter(c, idle_s)))
               for k, c in (("queue", r), ("also", also))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [out["queue"], out["also"]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "slow", "small"], default="small")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=300, help="max_tokens per job")
    ap.add_argument("--jobs", type=int, default=30, help="1-token jobs for the per-job cost")
    ap.add_argument("--idle-s", type=float, default=5.0)
    args = ap.parse_args(argv)
    path = model_file(args.model)
    # The stream limits are per address, and every client here shares one: let the load decide.
    env = {"INFERQ_MAX_STREAMS_PER_TOKEN": "100000"}
    with stack({"cost": path}, threads=args.threads, worker_args=("--parallel", str(args.parallel)),
               env_extra=env) as (url, redis_url):
        tokens, per_token, per_job, base, meter = phases(url, redis.Redis.from_url(redis_url), "cost", args.clients,
                                                         args.rounds, args.tokens, args.jobs, args.idle_s)
    cpu_us = per_token["cpu_s"] / tokens * 1e6
    calls = per_token["calls"] / tokens
    print(f"redis cost: model={args.model} --parallel {args.parallel}, {args.clients} clients, "
          f"{tokens} tokens in {per_token['seconds']:.1f} s ({tokens / per_token['seconds']:.0f} tok/s)")
    print(f"  idle stack: {meter.idle_cpu_per_s * 1e3:.2f} ms of Redis CPU/s, {meter.idle_calls_per_s:.1f} commands/s")
    print(f"  per token:  {cpu_us:7.1f} µs Redis CPU   {calls:5.2f} commands "
          f"(all of Redis's CPU over the load: {per_token['cpu_s_all'] / tokens * 1e6:.1f} µs)")
    print(f"  floor:      {base['cpu_us_per_token']:7.1f} µs Redis CPU   {base['calls_per_token']:5.2f} commands "
          f"(one XADD per token, pipelined)")
    print(f"  ratio inferq / floor: {cpu_us / base['cpu_us_per_token']:.1f}x CPU, "
          f"{calls / base['calls_per_token']:.1f}x commands")
    print(f"  one core carries {1e6 / cpu_us:,.0f} tok/s at this cost")
    print("  where the per-token commands go (calls per token, µs per token by commandstats):")
    for name, (n, usec) in list(per_token["by_command"].items())[:12]:
        print(f"    {name:<22}{n / tokens:7.2f}{usec / tokens:9.1f}")
    job_cpu = per_job["cpu_s"] / args.jobs * 1e6
    print(f"  per 1-token job: {per_job['calls'] / args.jobs:.0f} commands, {job_cpu:.0f} µs Redis CPU")
    for name, (n, usec) in list(per_job["by_command"].items())[:12]:
        print(f"    {name:<22}{n / args.jobs:7.1f}{usec / args.jobs:9.1f}")
    save("redis_cost", {"model": args.model, "parallel": args.parallel, "clients": args.clients, "tokens": tokens,
                        "seconds": per_token["seconds"], "cpu_us_per_token": cpu_us, "calls_per_token": calls,
                        "floor_cpu_us_per_token": base["cpu_us_per_token"],
                        "job_calls": per_job["calls"] / args.jobs, "job_cpu_us": job_cpu,
                        "by_command_per_token": {k: [n / tokens, u / tokens]
                                                 for k, (n, u) in per_token["by_command"].items()}})


if __name__ == "__main__":
    main()
