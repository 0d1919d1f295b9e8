"""Jobs/s accepted by POST /v1/jobs with 1, 8 and 32 clients, against RQ's own Queue.enqueue in the same run.

    python -m bench.enqueue --seconds 3

The model's worker is paused (SIGSTOP) during each row, so only acceptance is measured: the
API validates, checks the model and the queue bound, logs the `queued`
event and enqueues in one MULTI/EXEC. The baseline enqueues trivial
JSON-serialized jobs with RQ directly from one client.
"""
from __future__ import annotations

import argparse
import http.client
import json
import signal
import threading
import time

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from bench.harness import model_file, save, stack
from queue_schema.lifecycle import registry


def rq_baseline(redis_url: str, seconds: float) -> float:
    q = Queue("bench.baseline", connection=redis.Redis.from_url(redis_url), serializer=JSONSerializer)
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        q.enqueue("worker.infer_job.run_infer", payload={"operation": "infer"})
        n += 1
    return n / seconds


def api_rate(url: str, clients: int, seconds: float) -> tuple[float, int]:
    counts, errors = [0] * clients, [0] * clients
    end = time.monotonic() + seconds
    body = json.dumps({"operation": "infer", "model": "bench", "prompt": "hello", "max_tokens": 8})
    host, port = url.removeprefix("http://").split(":")

    def client(i):
        # http.client on a kept-alive connection: the clients share the API's two cores, and
        # requests spends several times the API's own time per call building and parsing.
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        while time.monotonic() < end:
            conn.request("POST", "/v1/jobs", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 202:
                counts[i] += 1
            else:
                errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds, sum(errors)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--api-processes", type=int, default=1)
    args = ap.parse_args(argv)
    path = model_file("tiny")
    workers: list = []
    with stack({"bench": path}, threads=1, api_processes=args.api_processes, worker_args=("--queue-depth", "10000000"),
               env_extra={"INFERQ_MAX_QUEUE_DEPTH": "10000000"}, procs_out=workers) as (url, redis_url):
        def paused(measure):
            """Measure with the workers stopped (acceptance, not decoding), then let them run long enough
            to heartbeat: a worker silent past its TTL makes the model offline and the API refuses jobs."""
            for w in workers:
                w.send_signal(signal.SIGSTOP)
            try:
                return measure()
            finally:
                for w in workers:
                    w.send_signal(signal.SIGCONT)
                time.sleep(registry.HEARTBEAT_INTERVAL_S + 0.5)

        baseline = paused(lambda: rq_baseline(redis_url, args.seconds))
        rows = [(c, *paused(lambda c=c: api_rate(url, c, args.seconds))) for c in (1, 8, 32)]
    print(f"enqueue: {args.seconds:.0f} s per row, {args.api_processes} API process(es) (gunicorn+gevent)")
    print(f"{'who':34}{'jobs/s':>10}{'errors':>8}")
    print(f"{'RQ Queue.enqueue, 1 client':34}{baseline:10.0f}{0:8d}")
    for clients, rate, errors in rows:
        print(f"{f'POST /v1/jobs, {clients} clients':34}{rate:10.0f}{errors:8d}")
    best = max(r for _, r, _ in rows)
    print(f"ratio best API rate / RQ enqueue: {best / baseline:.2f}")
    save("enqueue", {"rq_enqueue": baseline, "api": [{"clients": c, "rate": r, "errors": e} for c, r, e in rows]})


if __name__ == "__main__":
    main()
