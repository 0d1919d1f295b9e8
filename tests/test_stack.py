"""`inferq up` as a user runs it, and worker shutdown on SIGTERM."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from inferq.client import Client
from inferq.embedded_redis import free_port
from tests.conftest import ROOT, wait_until
from tests.helpers import events, process_state, submit
from tests.test_demo_model import reference_text


@pytest.mark.slow
def test_inferq_up_serves_the_demo_model_and_stops_cleanly(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["INFERQ_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONUNBUFFERED"] = "1"  # its lines arrive as printed, for the reader below
    proc = subprocess.Popen([sys.executable, "-m", "inferq", "up", "--port", str(port), "--threads", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    api = Client(f"http://127.0.0.1:{port}")
    try:
        # Its own "is up" line, not just /ready: the line comes once inferq up has seen /ready itself.
        wait_until(lambda: proc.poll() is not None or any(line.startswith("inferq is up") for line in lines),
                   timeout=60, what="inferq up")
        assert proc.poll() is None
        assert [m["id"] for m in api.models()] == ["demo"]
        expected, n = reference_text("def ")
        job = api.submit("def ", model="demo", max_tokens=n, temperature=0, repetition_penalty=1.0)["job_id"]
        evts = list(api.events(job))
        assert evts[-1]["type"] == "end" and evts[-1]["tokens_out"] == n
        # Through Redis, the worker and SSE, the text is what the PyTorch model wrote.
        assert "".join(e["t"] for e in evts if e["type"] == "token") == expected
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        reader.join(10)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    # The queue is durable: the job went to the AOF (redis 6.2 writes appendonly.aof, 7 an appendonlydir).
    data = tmp_path / "data" / "redis"
    aof = b"".join(p.read_bytes() for p in data.rglob("appendonly*") if p.is_file())
    assert job.encode() in aof, sorted(p.name for p in data.iterdir())
    # Its password is in the URLs the children got, never in what `inferq up` prints.
    password = (data / "redis.conf").read_text().split()[1]
    up_line = next(line for line in lines if line.startswith("inferq is up"))
    assert "redis: redis://:***@127.0.0.1:" in up_line and password not in out


def test_worker_finishes_its_job_on_sigterm_and_exits_0(client, worker_factory, slow_model):
    w = worker_factory("term", slow_model, "--parallel", "1")
    job = submit(client, model="term", prompt="finish me", max_tokens=600, temperature=0)
    assert events(client, job, until="token")[-1]["type"] == "token"
    queued_after = submit(client, model="term", prompt="not taken", max_tokens=2)
    w.proc.send_signal(signal.SIGTERM)
    evts = events(client, job)
    # Finished normally (random weights may hit EOS before max_tokens), not cut short.
    assert evts[-1]["type"] == "end" and evts[-1]["stop_reason"] in ("max_tokens", "eos")
    assert w.proc.wait(30) == 0
    # It took no new job: the next one is still queued, for another worker.
    assert client.get(f"/v1/jobs/{queued_after}").get_json()["state"] == "queued"
    other = worker_factory("term", slow_model)
    assert events(client, queued_after)[-1]["type"] == "end"
    other.stop()


@pytest.mark.slow
def test_inferq_demo_streams_a_continuation_of_the_prompt(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["INFERQ_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run([sys.executable, "-m", "inferq", "--log-level", "WARNING", "demo", "--port",
                           str(free_port()), "--max-tokens", "16", "import "],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("import ") and len(proc.stdout.strip()) > len("import ")
    assert "[16 tokens" in proc.stderr and "Traceback" not in proc.stderr


def _children(pid: int) -> set[int]:
    """The processes ``pid`` started (Linux)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and process_state(pid) != "Z"


@contextmanager
def two_workers_of_one_model(tmp_path, model_path, *extra: str):
    """``inferq up`` with two workers of the model ``same``: yields (process, lines, worker pids, every child pid)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["INFERQ_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "inferq", "up", "--port", str(port), "--threads", "1",
                             "--model", f"same={model_path}", "--model", f"same={model_path}", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    children: set[int] = set()
    try:
        wait_until(lambda: proc.poll() is not None or any(line.startswith("inferq is up") for line in lines),
                   timeout=90, what="inferq up")
        assert proc.poll() is None, "".join(lines)

        def both_listed():
            workers = requests.get(f"http://127.0.0.1:{port}/v1/workers", timeout=5).json()["workers"]
            pids = sorted(w["pid"] for w in workers if w["model"] == "same")
            return pids if len(pids) == 2 else None

        pids = wait_until(both_listed, timeout=30, what="both workers in /v1/workers")
        children = _children(proc.pid)
        yield proc, lines, pids, children
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:  # whatever the test found left over
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_inferq_up_stops_every_worker_even_two_of_one_model(tmp_path, tiny_model):
    with two_workers_of_one_model(tmp_path, tiny_model, "--stop-timeout", "3") as (proc, lines, pids, children):
        # Both are served: one did not replace the other.
        assert len(pids) == 2 and set(pids) <= children, (pids, children)
        # Each child runs in a process group of its own: a Ctrl-C in the terminal reaches
        # `inferq up` alone, which then stops the API, the workers and Redis in that order.
        assert all(os.getpgid(pid) != os.getpgid(proc.pid) for pid in pids)
        frozen, healthy = pids
        os.kill(frozen, signal.SIGSTOP)  # cannot act on SIGTERM: it must be killed after --stop-timeout
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        took = time.monotonic() - t0
    out = "".join(lines)
    assert "Traceback" not in out and "inferq stopped" in out, out
    killed = [line for line in out.splitlines() if "did not stop within 3 s" in line]
    assert len(killed) == 1 and f"(pid {frozen})" in killed[0] and "worker same #" in killed[0], out
    assert str(healthy) not in "".join(killed)
    assert took < 30, out
    left = [pid for pid in children if _alive(pid)]
    assert not left, (left, out)


@pytest.mark.slow
def test_a_dead_child_is_named_and_the_rest_of_the_stack_stopped(tmp_path, tiny_model):
    with two_workers_of_one_model(tmp_path, tiny_model) as (proc, lines, pids, children):
        os.kill(pids[1], signal.SIGKILL)
        assert proc.wait(60) == 1
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, "".join(lines)
    assert re.fullmatch(rf"Error: worker same #[12] \(pid {pids[1]}\) was killed by SIGKILL, so the stack was "
                        r"stopped\n", errors[0]), errors
    left = [pid for pid in children if _alive(pid)]
    assert not left, (left, "".join(lines))


def test_every_worker_gets_a_label_of_its_own():
    from inferq.stack import WorkerArgs, worker_labels

    workers = [WorkerArgs("m", "a.gguf"), WorkerArgs("m", "b.gguf"), WorkerArgs("n", "c.gguf"),
               WorkerArgs("m", "a.gguf", device="cuda:0"), WorkerArgs("m", "a.gguf", device="cuda:1")]
    assert worker_labels(workers) == ["worker m #1", "worker m #2", "worker n", "worker m on cuda:0",
                                      "worker m on cuda:1"]
