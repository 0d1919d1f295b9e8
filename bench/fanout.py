"""Fan-out: 100 and 1,000 concurrent SSE clients on one API process (gunicorn + gevent).

    python -m bench.fanout --clients 100 1000 --max-tokens 60

All clients attach to one job while its worker is paused, then the worker
resumes: every token event goes to every client. Latency is the client's
receipt time minus the event's own ``ts`` (same machine, same clock);
missed events are gaps in a client's seq list (must be 0).

The clients run on the same cores as the API, Redis and the worker, so what
they spend reading is taken from the server. Two kinds: ``requests`` (the
usual Python client: urllib3 and inferq's SSE parser per event) and ``raw``
(a socket read and one JSON parse per event, about what a browser's
EventSource costs), each in its own rows. The stream limits are raised to fit the largest round (every
client is one address), and the run prints them.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import redis  # noqa: E402
import requests  # noqa: E402

from bench.harness import model_file, pct, save, stack  # noqa: E402
from inferq.client import chunk_lines, parse_sse  # noqa: E402


def watch(url: str, job_id: str, connected: list, out: list) -> None:
    seqs, lat = [], []
    with requests.get(f"{url}/v1/jobs/{job_id}/stream", stream=True, timeout=120) as resp:
        connected.append(1)
        for frame in parse_sse(resp.iter_lines(chunk_size=None)):
            now_ms = time.time() * 1000
            event = json.loads(frame["data"])
            seqs.append(event["seq"])
            if event["type"] == "token":
                lat.append(now_ms - event["ts"])
            if event["type"] in ("end", "error"):
                break
    out.append((seqs, lat))


def watch_raw(url: str, job_id: str, connected: list, out: list) -> None:
    host, port = url.split("//", 1)[1].split(":")
    seqs, lat = [], []
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(f"GET /v1/jobs/{job_id}/stream HTTP/1.1\r\nHost: {host}\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        read_ms = [0.0]

        def received():
            while chunk := sock.recv(65536):
                read_ms[0] = time.time() * 1000
                yield chunk

        # Each relay write is one HTTP chunk of whole SSE frames, so a data line is
        # never cut by chunk framing; the chunk-size lines are simply not data lines.
        for line in chunk_lines(received()):
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])  # json skips the optional space
            if not seqs:
                connected.append(1)  # subscribed and replayed: as requests' headers arrive
            seqs.append(event["seq"])
            if event["type"] == "token":
                lat.append(read_ms[0] - event["ts"])
            elif event["type"] in ("end", "error"):
                break
    out.append((seqs, lat))


def count_connections(redis_url: str, peak: list, stop) -> None:
    """Keep the most Redis client connections seen while the round runs (all processes)."""
    client = redis.Redis.from_url(redis_url)
    while not stop.is_set():
        peak[0] = max(peak[0], client.info("clients")["connected_clients"])
        gevent.sleep(0.05)


def one_round(url: str, redis_url: str, workers: list, clients: int, max_tokens: int, kind: str) -> dict:
    for w in workers:
        w.send_signal(signal.SIGSTOP)
    job = requests.post(f"{url}/v1/jobs", json={"operation": "infer", "model": "fan", "prompt": "fan out",
                                               "max_tokens": max_tokens, "temperature": 0}, timeout=10).json()
    connected, out, peak, stop = [], [], [0], gevent.event.Event()
    counter = gevent.spawn(count_connections, redis_url, peak, stop)
    reader = watch_raw if kind == "raw" else watch
    greenlets = [gevent.spawn(reader, url, job["job_id"], connected, out) for _ in range(clients)]
    deadline = time.monotonic() + 60
    while len(connected) < clients and time.monotonic() < deadline:
        gevent.sleep(0.05)
    gevent.sleep(0.5)  # let the last ones finish replaying the queued event
    for w in workers:
        w.send_signal(signal.SIGCONT)
    gevent.joinall(greenlets, timeout=180)
    stop.set()
    counter.join()
    latencies = [x for _, lat in out for x in lat]
    complete = [s for s, _ in out if s == list(range(len(s))) and s]
    expected = max((len(s) for s, _ in out), default=0)
    missed = sum(expected - len(s) for s, _ in out) + (clients - len(out)) * expected
    return {"clients": clients, "kind": kind, "finished": len(out), "gapless": len(complete), "missed": missed,
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p99": pct(latencies, 0.99) if latencies else float("nan"), "events": len(latencies),
            "redis_connections": peak[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--max-tokens", type=int, default=60)
    ap.add_argument("--model", choices=["tiny", "slow", "small"], default="small")
    ap.add_argument("--client-kinds", nargs="+", choices=["requests", "raw"], default=["requests", "raw"])
    args = ap.parse_args(argv)
    path = model_file(args.model)
    workers: list = []
    # Every client here is one address and one principal (auth off): the stream limits of a process (900) and
    # of a principal (100) would refuse most of them, and the run would measure refusals. Raised to fit the
    # largest round, below gunicorn's worker_connections (2,000) so /health keeps its room.
    bound = max(args.clients) + 50
    if bound > 1950:
        ap.error("one API process takes at most 1,900 streams (gunicorn's worker_connections is 2,000)")
    limits = {"INFERQ_MAX_STREAMS": str(bound), "INFERQ_MAX_STREAMS_PER_TOKEN": str(bound)}
    with stack({"fan": path}, threads=1, procs_out=workers, env_extra=limits) as (url, redis_url):
        rows = [one_round(url, redis_url, workers, n, args.max_tokens, kind)
                for kind in args.client_kinds for n in args.clients]
    print(f"fan-out: one job, model={args.model}, {args.max_tokens} tokens, 1 API process (gunicorn+gevent), "
          f"stream limits set to {bound} (INFERQ_MAX_STREAMS, INFERQ_MAX_STREAMS_PER_TOKEN)")
    print(f"{'client':>9}{'clients':>8}{'finished':>10}{'gap-free':>10}{'missed':>8}{'token events':>14}"
          f"{'p50 ms':>9}{'p99 ms':>9}"
          f"{'redis conns':>13}")
    for r in rows:
        print(f"{r['kind']:>9}{r['clients']:8d}{r['finished']:10d}{r['gapless']:10d}{r['missed']:8d}{r['events']:14d}"
              f"{r['p50']:9.1f}{r['p99']:9.1f}{r['redis_connections']:13d}")
    most = max(r["clients"] for r in rows)
    print("headline: " + "; ".join(f"{most} streams ({r['kind']} clients) p99 {r['p99']:.1f} ms, {r['missed']} missed"
                                   for r in rows if r["clients"] == most))
    save("fanout", {"model": args.model, "max_tokens": args.max_tokens, "rows": rows})


if __name__ == "__main__":
    main()
