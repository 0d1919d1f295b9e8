"""`inferq up` as a user runs it, and worker shutdown on SIGTERM."""
import os
import signal
import subprocess
import sys
import threading

import pytest

from inferq.client import Client
from inferq.embedded_redis import free_port
from tests.conftest import ROOT, wait_until
from tests.test_demo_model import reference_text
from tests.helpers import events, submit


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
