"""``inferq up``: Redis, the API (gunicorn + gevent) and one worker per model, on one machine."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from inferq.embedded_redis import EmbeddedRedis, masked

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerArgs:
    name: str
    path: str
    backend: str = "auto"
    gpu_layers: int = 0
    threads: int = 0
    device: str = "cpu"


class StackError(Exception):
    pass


class Interrupted(Exception):
    """SIGINT/SIGTERM reached ``inferq up``: time to stop the stack."""


def _interrupt(signum, frame):
    raise Interrupted()


class Stack:
    def __init__(self, workers: list[WorkerArgs], host: str = "127.0.0.1", port: int = 8000,
                 data_dir: str | Path = ".inferq", redis_url: str | None = None, api_processes: int = 1):
        self.workers = workers
        self.host, self.port = host, port
        self.data_dir = Path(data_dir)
        self.redis_url = redis_url
        self.api_processes = api_processes
        self.redis: EmbeddedRedis | None = None
        self.children: dict[str, subprocess.Popen] = {}

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _env(self) -> dict:
        # Children log at the level `inferq up` was given.
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        return {**os.environ, "REDIS_URL": self.redis_url, "INFERQ_LOG_LEVEL": level}

    def start(self, ready_timeout: float = 120.0) -> None:
        if not self.redis_url:
            self.redis = EmbeddedRedis(self.data_dir / "redis").start()
            self.redis_url = self.redis.url
            log.info("started redis-server on %s (data in %s)", masked(self.redis_url), self.redis.data_dir)
        for w in self.workers:
            cmd = [sys.executable, "-m", "inferq", "worker", "--model", f"{w.name}={w.path}", "--backend", w.backend,
                   "--gpu-layers", str(w.gpu_layers), "--threads", str(w.threads), "--device", w.device]
            self.children[f"worker {w.name}"] = subprocess.Popen(cmd, env=self._env())
        api_cmd = [sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf", "--workers",
                   str(self.api_processes), "--bind", f"{self.host}:{self.port}", "--graceful-timeout", "10",
                   "--log-level", "warning", "api.wsgi:app"]
        self.children["api"] = subprocess.Popen(api_cmd, env=self._env())
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_children()
            try:
                if requests.get(self.api_url + "/ready", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise StackError(f"the stack was not ready after {timeout:.0f}s (see the log above)")

    def check_children(self) -> None:
        for name, proc in self.children.items():
            code = proc.poll()
            if code is not None:
                raise StackError(f"{name} exited with code {code}")

    def run(self, on_ready=None) -> None:
        """Start, call ``on_ready``, and serve until SIGINT/SIGTERM or a child dies; always stop.

        The handlers go in before anything starts: a signal that arrives while
        the stack is still starting must not leave orphaned children.
        """
        old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            if on_ready:
                on_ready(self)
            while True:
                self.check_children()
                time.sleep(0.3)
        except Interrupted:
            pass
        finally:
            for s in old:
                signal.signal(s, signal.SIG_IGN)  # stopping takes a moment; don't cut it short
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)

    def stop(self) -> None:
        """API first (no new jobs), then workers (each finishes its job), then Redis."""
        order = ["api"] + [n for n in self.children if n != "api"]
        for name in order:
            proc = self.children.get(name)
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name in order:
            proc = self.children.get(name)
            if proc:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.children.clear()
        if self.redis:
            self.redis.stop()
