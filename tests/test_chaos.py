"""Chaos: real Redis, API and two workers; kill a worker and restart Redis while jobs stream.

Every job must end exactly once, with a gap-free stream whose text equals
its stored result; the only error allowed is WORKER_LOST for jobs the killed
worker had started.
"""
import signal
import threading
import time

import pytest

from inferq.client import Client
from inferq.embedded_redis import EmbeddedRedis
from tests.conftest import start_api, start_worker

pytestmark = pytest.mark.slow


@pytest.fixture()
def chaos_stack(tmp_path, slow_model):
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    api = start_api(server.url, tmp_path / "api.log")
    workers = [start_worker(server.url, "chaos", slow_model, tmp_path) for _ in range(2)]
    client = Client(api.url, timeout=5)
    state = {"server": server, "workers": workers, "client": client, "tmp": tmp_path, "model": slow_model}
    yield state
    for w in state["workers"]:
        w.stop(signal.SIGKILL)
    api.stop()
    server.stop()


def _up(client):
    try:
        return client._request("GET", "/health").ok
    except Exception:
        return False


def test_kill_a_worker_and_restart_redis_mid_run(chaos_stack):
    client = chaos_stack["client"]
    sizes = [60, 300, 120, 400, 80, 250, 40, 350, 150, 200, 90, 300]
    job_ids = [client.submit(f"job {i}", model="chaos", max_tokens=n, temperature=0)["job_id"]
               for i, n in enumerate(sizes)]
    seen: dict[str, list] = {}

    def watch(job_id):
        seen[job_id] = list(client.events(job_id))

    threads = [threading.Thread(target=watch, args=(j,), daemon=True) for j in job_ids]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = chaos_stack["workers"][0]
    victim.proc.send_signal(signal.SIGKILL)
    chaos_stack["workers"].append(start_worker(chaos_stack["server"].url, "chaos", chaos_stack["model"],
                                               chaos_stack["tmp"], wait=False))
    time.sleep(1.0)
    chaos_stack["server"].stop()  # Redis goes away with jobs queued and streams open
    time.sleep(1.5)
    chaos_stack["server"].start()
    for t in threads:
        t.join(120)
    assert all(not t.is_alive() for t in threads), "some streams never ended"

    outcomes = {"end": 0, "error": 0}
    for job_id in job_ids:
        evts = seen[job_id]
        assert [e["seq"] for e in evts] == list(range(len(evts))), f"gap or duplicate in {job_id}"
        terminal = [e for e in evts if e["type"] in ("end", "error")]
        assert len(terminal) == 1 and evts[-1] is terminal[0]
        status = client.status(job_id)
        last = terminal[0]
        outcomes[last["type"]] += 1
        if last["type"] == "end":
            text = "".join(e["t"] for e in evts if e["type"] == "token")
            assert last["text"] == text == status["result"]["text"]
            assert status["state"] == "finished"
        else:
            assert last["code"] == "WORKER_LOST" and status["state"] == "failed"
    # At most the jobs the victim held when killed (a worker decodes up to 4 at once by default).
    assert outcomes["error"] <= 4 and outcomes["end"] + outcomes["error"] == len(job_ids)
