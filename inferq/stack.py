"""``inferq up``: Redis, the API (gunicorn + gevent) and one worker per model, on one machine.

Every child is tracked under a label of its own (two workers of one model are
``worker m #1`` and ``worker m #2``), so each is stopped: the API first (no new
jobs), then the workers (each finishes its running jobs), then Redis; a child
still running after ``stop_timeout`` seconds is killed, and the log says so.
Children run in their own process groups: a Ctrl-C in the terminal reaches
``inferq up`` alone, which then stops them in that order, instead of reaching
every worker at the same moment as the API.
"""
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
from queue_schema.errors import CodedError, StartError

log = logging.getLogger(__name__)
DEFAULT_MAXMEMORY = "1gb"  # the embedded Redis's; INFERQ_REDIS_MAXMEMORY or --redis-maxmemory change it


@dataclass(frozen=True)
class WorkerArgs:
    name: str
    path: str
    backend: str = "auto"
    gpu_layers: int = 0
    threads: int = 0
    device: str = "cpu"
    chat_template: str | None = None  # NAME|PATH for `inferq worker --chat-template`; None: the file's own


class StackError(StartError):
    """A part of the stack could not start, or stopped."""


@dataclass
class Child:
    label: str  # unique within the stack: what the log and errors call it
    proc: subprocess.Popen


def worker_labels(workers: list[WorkerArgs]) -> list[str]:
    """``worker NAME`` (``on cuda:N`` for a GPU), numbered where several would read the same."""
    bases = [f"worker {w.name}" + ("" if w.device == "cpu" else f" on {w.device}") for w in workers]
    seen: dict[str, int] = {}
    labels = []
    for base in bases:
        seen[base] = seen.get(base, 0) + 1
        labels.append(f"{base} #{seen[base]}" if bases.count(base) > 1 else base)
    return labels


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Interrupted(CodedError):
    """SIGINT/SIGTERM reached ``inferq up``: time to stop the stack."""


def _interrupt(signum, frame):
    raise Interrupted()


class Stack:
    def __init__(self, workers: list[WorkerArgs], host: str = "127.0.0.1", port: int = 8000,
                 data_dir: str | Path = ".inferq", redis_url: str | None = None, api_processes: int = 1,
                 stop_timeout: float = 60.0, redis_maxmemory: str = DEFAULT_MAXMEMORY):
        self.workers = workers
        self.host, self.port = host, port
        self.data_dir = Path(data_dir)
        self.redis_url = redis_url
        self.api_processes = api_processes
        self.stop_timeout = stop_timeout
        self.redis_maxmemory = redis_maxmemory
        self.redis: EmbeddedRedis | None = None
        self.children: list[Child] = []  # in start order; every process started, until stopped

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _env(self) -> dict:
        # Children log at the level `inferq up` was given.
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        return {**os.environ, "REDIS_URL": self.redis_url, "INFERQ_LOG_LEVEL": level}

    def start(self, ready_timeout: float = 120.0) -> None:
        if not self.redis_url:
            self.redis = EmbeddedRedis(self.data_dir / "redis", maxmemory=self.redis_maxmemory).start()
            self.redis_url = self.redis.url
            log.info("started redis-server on %s (data in %s)", masked(self.redis_url), self.redis.data_dir)
        for w, label in zip(self.workers, worker_labels(self.workers)):
            cmd = [sys.executable, "-m", "inferq", "worker", "--model", f"{w.name}={w.path}", "--backend", w.backend,
                   "--gpu-layers", str(w.gpu_layers), "--threads", str(w.threads), "--device", w.device]
            if w.chat_template:
                cmd += ["--chat-template", w.chat_template]
            self._spawn(label, cmd)
        api_cmd = [sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf", "--workers",
                   str(self.api_processes), "--bind", f"{self.host}:{self.port}", "--graceful-timeout", "10",
                   "--log-level", "warning", "api.wsgi:app"]
        self._spawn("api", api_cmd)
        self._wait_ready(ready_timeout)

    def _spawn(self, label: str, cmd: list[str]) -> Child:
        # A session of its own: the terminal's Ctrl-C goes to `inferq up` only, which stops
        # the children in order (a worker hit by Ctrl-C and then by our SIGTERM would take the
        # second signal as "end the running jobs now").
        child = Child(label, subprocess.Popen(cmd, env=self._env(), start_new_session=True))
        self.children.append(child)
        log.debug("started %s (pid %d)", label, child.proc.pid)
        return child

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
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                # Raised out of run(), which stops the rest first: the line is printed once they have.
                raise StackError(f"{child.label} (pid {child.proc.pid}) {_exit_text(code)}, so the stack was stopped")

    def run(self, on_ready=None) -> None:
        """Start, call ``on_ready``, and serve until SIGINT/SIGTERM or a child dies; always stop.

        The handlers go in before anything starts: a signal that arrives while
        the stack is still starting must not leave orphaned children.
        """
        # SIGHUP too: the children are in sessions of their own, so a closed terminal reaches only us.
        old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
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
        """API first (no new jobs), then workers (each finishes its jobs), then Redis; every child, always."""
        api = [c for c in self.children if c.label == "api"]
        self._stop_group(api)
        self._stop_group([c for c in self.children if c not in api])
        self.children.clear()
        if self.redis:
            self.redis.stop()

    def _stop_group(self, children: list[Child]) -> None:
        """SIGTERM to each, then wait for all; past ``stop_timeout`` seconds, SIGKILL (and say so)."""
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for child in children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop within %.0f s of SIGTERM; killing it", child.label,
                            child.proc.pid, self.stop_timeout)
                child.proc.kill()
                child.proc.wait()
