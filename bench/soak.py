"""Chaos soak: thousands of jobs while workers are SIGKILLed, Redis freezes and restarts, clients cancel and reconnect.

    python -m bench.soak --jobs 5000
    python -m bench.soak --jobs 1000 --clients 16   # the CI-sized run (tests/test_soak.py)

A real stack on this machine: redis-server with AOF, a gunicorn API and
``--workers`` workers of the ``slow`` test model with ``--parallel`` slots.
While clients submit and read jobs (dropping their connections at random
and resuming with Last-Event-ID, cancelling some), a chaos thread, at random
moments, SIGKILLs a worker (and starts a new one), freezes Redis with SIGSTOP
for longer than a worker's heartbeat TTL, and restarts Redis (SIGTERM, then
start on the same AOF). At the end every accepted job is checked:

- lost: its stream has no terminal event, or more than one, or a seq gap;
- run twice after a token: a ``started`` event after the job had streamed a token;
- text mismatches: an ``end`` whose text is not the streamed tokens joined
  (a token duplicated or missing shows here);
all of which must be 0. Redis memory is sampled throughout (``--job-ttl``
shortens how long ended jobs are kept, to see it level off).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis
import requests

from bench.harness import OUT, ROOT, model_file, save
from inferq.client import chunk_lines, parse_sse
from inferq.embedded_redis import EmbeddedRedis, free_port
from queue_schema.lifecycle import registry

REDIS_FREEZE_S = registry.WORKER_TTL_S + 2


class Stack:
    def __init__(self, workers: int, parallel: int, job_ttl: int):
        self.redis = EmbeddedRedis(OUT / "soak-redis", appendonly=True)
        self.parallel = parallel
        self.env = {**os.environ, "INFERQ_LOG_LEVEL": "WARNING", "INFERQ_JOB_TTL_S": str(job_ttl),
                    "INFERQ_KEEPALIVE_S": "1"}
        self.model = model_file("slow")
        self.n_workers = workers
        self.workers: list[subprocess.Popen] = []
        self.api: subprocess.Popen | None = None
        self.url = ""
        self.lock = threading.Lock()
        self.events = {"worker kills": 0, "redis freezes": 0, "redis restarts": 0}

    def start(self) -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        for stale in (OUT / "soak-redis").glob("appendonly*"):
            stale.unlink()
        self.redis.start()
        self.env["REDIS_URL"] = self.redis.url
        self.workers = [self._worker() for _ in range(self.n_workers)]
        port = free_port()
        self.api = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf",
                                     "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "api.wsgi:app"],
                                    cwd=ROOT, env=self.env)
        self.url = f"http://127.0.0.1:{port}"
        client = redis.Redis.from_url(self.redis.url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            idle = [w for w in registry.live_workers(client) if w.state == "idle"]
            try:
                up = requests.get(self.url + "/health", timeout=1).ok
            except requests.RequestException:
                up = False
            if up and len(idle) >= self.n_workers:
                return
            time.sleep(0.2)
        raise RuntimeError("the soak stack did not come up")

    def _worker(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "inferq", "--log-level", "WARNING", "worker", "--model",
                                 f"soak={self.model}", "--threads", "1", "--parallel", str(self.parallel),
                                 "--queue-depth", "100000", "--redis-url", self.redis.url], cwd=ROOT, env=self.env)

    def kill_a_worker(self, rng: random.Random) -> None:
        with self.lock:
            i = rng.randrange(len(self.workers))
            self.workers[i].send_signal(signal.SIGKILL)
            self.workers[i].wait()
            self.workers[i] = self._worker()
            self.events["worker kills"] += 1

    def freeze_redis(self) -> None:
        with self.lock:
            self.redis.process.send_signal(signal.SIGSTOP)
            time.sleep(REDIS_FREEZE_S)
            self.redis.process.send_signal(signal.SIGCONT)
            self.events["redis freezes"] += 1

    def restart_redis(self) -> None:
        with self.lock:
            self.redis.stop()  # SIGTERM: the AOF is written whole
            time.sleep(1.0)
            self.redis.start()
            self.events["redis restarts"] += 1

    def used_memory(self) -> int | None:
        try:
            return redis.Redis.from_url(self.redis.url, socket_timeout=1).info("memory")["used_memory"]
        except redis.RedisError:
            return None

    def stop(self) -> None:
        procs = [p for p in (self.api, *self.workers) if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.redis.process and self.redis.process.poll() is None:
            self.redis.process.send_signal(signal.SIGCONT)
        self.redis.stop()


def _retrying(call, deadline: float):
    """``call()`` until it answers something other than 503 / a connection error, or ``deadline``."""
    delay = 0.1
    while True:
        try:
            resp = call()
            if resp.status_code != 503:
                return resp
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def read_stream(url: str, job_id: str, rng: random.Random, deadline: float) -> tuple[list[dict], int]:
    """The whole stream, hanging up at random and resuming from the last seq seen; Redis may be away."""
    events, drops, last = [], 0, None
    session = requests.Session()
    while time.monotonic() < deadline:
        headers = {} if last is None else {"Last-Event-ID": str(last)}
        drop_after = rng.choice([None, None, None, 1, 4, 12])
        resp = _retrying(lambda: session.get(f"{url}/v1/jobs/{job_id}/stream", headers=headers, stream=True,
                                             timeout=(5, 30)), deadline)
        if resp is None:
            break
        n = 0
        try:
            with resp:
                for frame in parse_sse(chunk_lines(resp.iter_content(chunk_size=None))):
                    event = json.loads(frame["data"])
                    events.append(event)
                    last = event["seq"]
                    if event["type"] in ("end", "error"):
                        return events, drops
                    n += 1
                    if drop_after is not None and n >= drop_after:
                        drops += 1
                        break
        except (requests.RequestException, ValueError):
            drops += 1  # the API lost Redis mid-stream and ended it, or the connection broke: resume
    return events, drops


def run_one(url: str, index: int, cancel_rate: float, seed: int, deadline: float) -> dict | None:
    rng = random.Random(seed * 100_003 + index)
    body = {"operation": "infer", "model": "soak", "prompt": f"soak {index}", "max_tokens": rng.randint(10, 150),
            "temperature": 0.8, "seed": index}
    resp = _retrying(lambda: requests.post(f"{url}/v1/jobs", json=body, timeout=(5, 30)), deadline)
    if resp is None or resp.status_code != 202:
        return None  # never accepted: not a job the system owes anything
    job_id = resp.json()["job_id"]
    if rng.random() < cancel_rate:
        threading.Timer(rng.uniform(0, 0.3), _cancel, args=(url, job_id)).start()
    events, drops = read_stream(url, job_id, rng, deadline)
    return check(job_id, events, drops)


def check(job_id: str, events: list[dict], drops: int) -> dict:
    seqs = [e["seq"] for e in events]
    terminal = [e for e in events if e["type"] in ("end", "error")]
    first_token = next((i for i, e in enumerate(events) if e["type"] == "token"), None)
    restarted_after_token = first_token is not None and any(e["type"] == "started" for e in events[first_token:])
    last_run = max((i for i, e in enumerate(events) if e["type"] == "started"), default=0)
    text = "".join(e["t"] for e in events[last_run:] if e["type"] == "token")
    end = terminal[-1] if terminal else None
    return {"job": job_id, "drops": drops, "lost": len(terminal) != 1 or seqs != list(range(len(seqs))),
            "twice": restarted_after_token, "runs": sum(1 for e in events if e["type"] == "started"),
            "kind": None if end is None else (end.get("stop_reason") if end["type"] == "end" else end["code"]),
            "text_ok": end is None or end["type"] != "end" or end["text"] == text}


def _cancel(url: str, job_id: str) -> None:
    try:
        requests.delete(f"{url}/v1/jobs/{job_id}", timeout=10)
    except requests.RequestException:  # Redis away: the job simply runs to its end
        pass


def chaos(stack: Stack, stop: threading.Event, rng: random.Random, kills: int, freezes: int,
          restarts: int) -> None:
    plan = ["kill"] * kills + ["freeze"] * freezes + ["restart"] * restarts
    rng.shuffle(plan)
    for action in plan:
        if stop.wait(rng.uniform(2.0, 6.0)):
            return
        {"kill": lambda: stack.kill_a_worker(rng), "freeze": stack.freeze_redis,
         "restart": stack.restart_redis}[action]()


def soak(jobs: int = 5000, workers: int = 2, parallel: int = 4, clients: int = 16, cancel_rate: float = 0.1,
         kills: int = 8, freezes: int = 2, restarts: int = 2, seed: int = 1, job_ttl: int = 120,
         timeout_s: float = 1800) -> dict:
    rng = random.Random(seed)
    stack = Stack(workers, parallel, job_ttl)
    stop = threading.Event()
    memory: list[tuple[float, int]] = []
    start = time.monotonic()
    try:
        stack.start()
        deadline = time.monotonic() + timeout_s

        def sample_memory():
            while not stop.wait(2.0):
                used = stack.used_memory()
                if used is not None:
                    memory.append((round(time.monotonic() - start, 1), used))

        threading.Thread(target=sample_memory, daemon=True).start()
        agent = threading.Thread(target=chaos, args=(stack, stop, rng, kills, freezes, restarts), daemon=True)
        agent.start()
        with ThreadPoolExecutor(clients) as pool:
            results = [r for r in pool.map(lambda i: run_one(stack.url, i, cancel_rate, seed, deadline),
                                           range(jobs)) if r is not None]
        stop.set()
        agent.join(REDIS_FREEZE_S + 5)
    finally:
        stop.set()
        stack.stop()
    kinds: dict[str, int] = {}
    for r in results:
        kinds[str(r["kind"])] = kinds.get(str(r["kind"]), 0) + 1
    return {"jobs": jobs, "accepted": len(results), "seconds": round(time.monotonic() - start, 1),
            "chaos": stack.events, "outcomes": kinds,
            "lost": sum(r["lost"] for r in results), "run_twice_after_a_token": sum(r["twice"] for r in results),
            "text_mismatches": sum(not r["text_ok"] for r in results),
            "requeued": sum(r["runs"] > 1 for r in results), "reconnects": sum(r["drops"] for r in results),
            "redis_memory": memory}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--cancel-rate", type=float, default=0.1)
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--freezes", type=int, default=2)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--job-ttl", type=int, default=120, help="seconds an ended job is kept (INFERQ_JOB_TTL_S)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    out = soak(args.jobs, args.workers, args.parallel, args.clients, args.cancel_rate, args.kills, args.freezes,
               args.restarts, args.seed, args.job_ttl)
    mem = out["redis_memory"]
    print(f"soak: {out['accepted']}/{out['jobs']} jobs accepted in {out['seconds']} s, {args.workers} workers x "
          f"{args.parallel} slots, {args.clients} clients; chaos: {out['chaos']}")
    print(f"outcomes: {out['outcomes']}; requeued {out['requeued']}, reconnects {out['reconnects']}")
    print(f"lost {out['lost']}  run twice after a token {out['run_twice_after_a_token']}  "
          f"text mismatches {out['text_mismatches']}   (all must be 0)")
    if mem:
        print("redis used_memory (MB) over time: " + ", ".join(f"{t:.0f}s {m / 1e6:.1f}" for t, m in mem[::5]))
    save("soak", out)


if __name__ == "__main__":
    main()
