"""Fixtures: a real redis-server, real GGUF files, real worker processes.

Isolation comes from names, not from wiping Redis: each test that needs its
own queue uses its own model name.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import requests

from inferq.embedded_redis import EmbeddedRedis, free_port
from inferq.testmodel import make_llama_gguf
from queue_schema.lifecycle import connection, registry

ROOT = Path(__file__).resolve().parent.parent
# Every API the tests start runs with the settings production uses.
GUNICORN = [sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture()
def r(redis_url) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir) -> Path:
    return make_llama_gguf(model_dir / "tiny.gguf", "tiny", seed=0)


@pytest.fixture(scope="session")
def slow_model(model_dir) -> Path:
    return make_llama_gguf(model_dir / "slow.gguf", "slow", seed=1)


@pytest.fixture(scope="session")
def small_model(model_dir) -> Path:
    """Tens of millions of parameters: decode steps of several ms on 2 cores, prefills of seconds."""
    return make_llama_gguf(model_dir / "small.gguf", "small", seed=0)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen, model: str, log_path: Path):
        self.proc, self.model, self.log_path = proc, model, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_worker(redis_url: str, model: str, path: Path, tmp: Path, *extra: str, wait: bool = True,
                 prefix: tuple[str, ...] = ()) -> WorkerProcess:
    """A worker process; ``prefix`` runs it under another command (``faketime``, say)."""
    log_path = tmp / f"worker-{model}-{uuid.uuid4().hex[:6]}.log"
    cmd = [*prefix, sys.executable, "-m", "inferq", "worker", "--model", f"{model}={path}", "--threads", "1",
           "--redis-url", redis_url, *extra]
    proc = subprocess.Popen(cmd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    worker = WorkerProcess(proc, model, log_path)
    if wait:
        try:
            wait_ready(redis_url, worker)
        except BaseException:  # never leave a worker behind a failed start
            proc.kill()
            proc.wait()
            raise
    return worker


def wait_ready(redis_url: str, worker: WorkerProcess) -> None:
    client = connection.client(redis_url)
    proc = worker.proc

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}:\n{worker.log()}")
        return any(w.pid == proc.pid and w.state == "idle" for w in registry.live_workers(client))

    wait_until(ready, what=f"worker for {worker.model}")


@pytest.fixture(scope="session")
def worker_factory(redis_url, tmp_path_factory):
    """Start real worker processes; all are stopped at the end of the session."""
    started: list[WorkerProcess] = []
    tmp = tmp_path_factory.mktemp("workers")

    def factory(model: str, path: Path, *extra: str, wait: bool = True) -> WorkerProcess:
        w = start_worker(redis_url, model, path, tmp, *extra, wait=False)
        started.append(w)  # before the wait: one that never gets ready is still killed at the end
        if wait:
            wait_ready(redis_url, w)
        return w

    yield factory
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


@pytest.fixture(scope="session")
def tiny_worker(worker_factory, tiny_model) -> WorkerProcess:
    return worker_factory("tiny", tiny_model)


BACKENDS = ("ctransformers", "llama-cpp")


@pytest.fixture(scope="session", params=BACKENDS)
def backend_name(request) -> str:
    from worker.backends.selection import installed

    if request.param not in installed():
        pytest.skip(f"{request.param} is not installed (make test installs it)")
    return request.param


@pytest.fixture(scope="session")
def tiny(worker_factory, tiny_model, backend_name) -> str:
    """A model name served by a worker on the backend under test: the pipeline suite runs on each."""
    name = f"tiny-{backend_name}"
    worker_factory(name, tiny_model, "--backend", backend_name)
    return name


@pytest.fixture(scope="session")
def slow_worker(worker_factory, slow_model) -> WorkerProcess:
    """One job at a time: the tests that use it queue jobs behind a running one."""
    return worker_factory("slow", slow_model, "--parallel", "1")


@pytest.fixture()
def app(redis_url):
    from api import create_app

    return create_app({"REDIS_URL": redis_url, "TESTING": True, "KEEPALIVE_S": 1.0})


@pytest.fixture()
def client(app):
    return app.test_client()


# Every API process on one Redis advances every batch, whichever claims it: they must agree on these.
SHARED_SETTINGS = {"BATCH_WINDOW": 4}


def start_api(redis_url: str, log_path: Path, workers: int = 1, bind: str = "127.0.0.1",
              **settings) -> tuple[subprocess.Popen, str]:
    """gunicorn + gevent serving the API on a free port of ``bind``, with ``INFERQ_<name>`` settings; waits until
    it answers (at 127.0.0.1)."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "INFERQ_KEEPALIVE_S": "1",
           **{f"INFERQ_{k}": str(v) for k, v in {**SHARED_SETTINGS, **settings}.items()}}
    proc = subprocess.Popen([*GUNICORN, "--workers", str(workers), "--bind", f"{bind}:{port}", "api.wsgi:app"],
                            cwd=ROOT, env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited:\n{log_path.read_text()}")
        try:
            return requests.get(url + "/health", timeout=1).ok
        except requests.RequestException:  # not listening yet, or slow to answer on a busy machine
            return False

    wait_until(up, what="gunicorn")
    return proc, url


@pytest.fixture(scope="session")
def live_api(redis_url, tmp_path_factory):
    """The API served for real by gunicorn + gevent on a free port."""
    # Tests open up to 150 streams on one job from this one address (auth off: one principal).
    proc, url = start_api(redis_url, tmp_path_factory.mktemp("api") / "gunicorn.log", MAX_STREAMS_PER_TOKEN=500)
    yield url
    proc.terminate()
    proc.wait(15)


class TenantAPI:
    """A live API with auth on: tenants alice and bob, an admin, webhooks to loopback."""

    ALICE, BOB, ADMIN = "tok-alice-live-0123456789", "tok-bob-live-00123456789", "tok-admin-live-0123456789"
    WEBHOOK_SECRET = "whsec_" + __import__("base64").b64encode(b"inferq-test-webhook-key-32-bytes").decode()

    def __init__(self, url: str, log_path: Path):
        self.url, self.log_path = url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def settings(self) -> dict:
        return {"API_TOKENS": f"alice:{self.ALICE},bob:{self.BOB}", "ADMIN_TOKENS": self.ADMIN,
                "WEBHOOK_SECRET": self.WEBHOOK_SECRET, "WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
                "WEBHOOK_RETRY_BASE_S": "0.3"}


@pytest.fixture(scope="session")
def tenant_api(redis_url, tmp_path_factory) -> TenantAPI:
    log_path = tmp_path_factory.mktemp("tenant-api") / "gunicorn.log"
    api = TenantAPI("", log_path)
    proc, api.url = start_api(redis_url, log_path, **api.settings())
    yield api
    proc.terminate()
    proc.wait(15)
