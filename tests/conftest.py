"""Fixtures: a real redis-server, real GGUF files, real worker processes.

Isolation comes from names, not from wiping Redis: each test that needs its
own queue uses its own model name.
"""
from __future__ import annotations

import os
import shutil
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
# Every process the tests start (and every app they build) inherits this: a lost worker is found in 5 s instead
# of production's 8, which the tests that kill or freeze workers would otherwise wait out. Renewals come every
# second, so a busy 2-core machine still has four to miss before a live worker looks lost.
os.environ.setdefault("INFERQ_LEASE_STALE_S", "5")


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
        # Serving: idle, or already busy with a job that was waiting for it.
        return any(w.pid == proc.pid and w.state in ("idle", "busy") for w in registry.live_workers(client))

    # Generous: a worker starts in a second or two, but three test processes on two cores can starve one.
    wait_until(ready, timeout=60, what=f"worker for {worker.model}")


class WorkerPool:
    """Starts real worker processes and stops them all when its scope ends: a worker left running would go on
    heartbeating, renewing and reaping on the shared Redis for the rest of the session."""

    def __init__(self, redis_url: str, tmp: Path):
        self.redis_url, self.tmp = redis_url, tmp
        self.started: list[WorkerProcess] = []

    def __call__(self, model: str, path: Path, *extra: str, wait: bool = True) -> WorkerProcess:
        w = start_worker(self.redis_url, model, path, self.tmp, *extra, wait=False)
        self.started.append(w)  # before the wait: one that never gets ready is still stopped
        if wait:
            wait_ready(self.redis_url, w)
        return w

    def stop_all(self) -> None:
        # SIGTERM to all at once, then the waits: an idle worker leaves the registry in well under a second.
        running = [w for w in self.started if w.proc.poll() is None]
        for w in running:
            w.proc.send_signal(signal.SIGTERM)
        for w in running:
            try:
                w.proc.wait(10)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()


@pytest.fixture(scope="session")
def session_workers(redis_url, tmp_path_factory):
    """Workers the whole session shares (tiny, slow)."""
    pool = WorkerPool(redis_url, tmp_path_factory.mktemp("workers"))
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def module_workers(redis_url, tmp_path_factory):
    """Workers that one module's fixtures share, stopped after its last test."""
    pool = WorkerPool(redis_url, tmp_path_factory.mktemp("module-workers"))
    yield pool
    pool.stop_all()


@pytest.fixture()
def worker_factory(redis_url, tmp_path):
    """Workers of one test, stopped when it ends."""
    pool = WorkerPool(redis_url, tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def tiny_worker(session_workers, tiny_model) -> WorkerProcess:
    return session_workers("tiny", tiny_model)


BACKENDS = ("ctransformers", "llama-cpp")


@pytest.fixture(scope="session", params=BACKENDS)
def backend_name(request) -> str:
    from worker.backends.selection import installed

    if request.param not in installed():
        pytest.skip(f"{request.param} is not installed (make test installs it)")
    return request.param


@pytest.fixture(scope="session")
def tiny(session_workers, tiny_model, backend_name) -> str:
    """A model name served by a worker on the backend under test: the pipeline suite runs on each."""
    name = f"tiny-{backend_name}"
    session_workers(name, tiny_model, "--backend", backend_name)
    return name


@pytest.fixture(scope="session")
def slow_worker(session_workers, slow_model) -> WorkerProcess:
    """One job at a time: the tests that use it queue jobs behind a running one."""
    return session_workers("slow", slow_model, "--parallel", "1")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium (Debian's) for the session; each test opens its own context or page."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture()
def app(redis_url):
    from api import create_app

    return create_app({"REDIS_URL": redis_url, "TESTING": True, "KEEPALIVE_S": 1.0})


@pytest.fixture()
def client(app):
    return app.test_client()


# Every API process on one Redis advances every batch, whichever claims it: they must agree on these.
SHARED_SETTINGS = {"BATCH_WINDOW": 4}


class ApiProcess:
    """gunicorn + gevent serving the API on a free port of ``bind``, with ``INFERQ_<name>`` settings: the one way
    the tests start an API process. ``start`` waits until it answers /health (at 127.0.0.1)."""

    def __init__(self, redis_url: str, log_path: Path | None = None, workers: int = 1, bind: str = "127.0.0.1",
                 args: tuple[str, ...] = (), env: dict | None = None, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cmd = [*GUNICORN, "--workers", str(workers), *args, "--bind", f"{bind}:{self.port}", "api.wsgi:app"]
        self.env = {**os.environ, "REDIS_URL": redis_url, "INFERQ_KEEPALIVE_S": "1",
                    **{f"INFERQ_{k}": str(v) for k, v in {**SHARED_SETTINGS, **settings}.items()}, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> ApiProcess:
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        if wait:
            wait_until(self.answers, what=f"the API at {self.url}")
        return self

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return requests.get(self.url + "/health", timeout=1).ok
        except requests.RequestException:  # not listening yet, or slow to answer on a busy machine
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else "(not kept)"

    def send_signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int:
        """Signal it (unless it has exited) and wait; killed if it outlives ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)


def start_api(redis_url: str, log_path: Path | None = None, **options) -> ApiProcess:
    return ApiProcess(redis_url, log_path, **options).start()


@pytest.fixture(scope="session")
def live_api(redis_url, tmp_path_factory):
    """The API served for real by gunicorn + gevent on a free port."""
    # Tests open up to 150 streams on one job from this one address (auth off: one principal).
    api = start_api(redis_url, tmp_path_factory.mktemp("api") / "gunicorn.log", MAX_STREAMS_PER_TOKEN=500)
    yield api.url
    api.stop()


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
    process = start_api(redis_url, log_path, **api.settings())
    api.url = process.url
    yield api
    process.stop()


def pytest_collection_modifyitems(config, items):
    """Across pytest-xdist's processes the slow tests go first: one that started last would hold the end of the
    run alone while the other processes sat idle. A run in one process keeps the files' order."""
    if getattr(config.option, "numprocesses", None):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
