"""A worker process's state: its loaded model and the threads around it.

One process holds one model for its whole life. The RQ job function finds
the runtime through ``current()`` because RQ calls jobs by import path.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis

from queue_schema import log_context, registry
from queue_schema.eventlog import EventLog
from queue_schema.events import Narration
from worker import gpu, narration, reaper
from worker.backends import Backend, LoadOptions, load_backend
from worker.cancel_watcher import CancelWatcher
from worker.gguf_meta import GGUFInfo
from worker.publisher import EventPublisher

log = logging.getLogger(__name__)
_current: "WorkerRuntime | None" = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    backend: str = "auto"
    options: LoadOptions = field(default_factory=LoadOptions)
    device: str = "cpu"
    queue_depth: int = 1000


class WorkerRuntime:
    def __init__(self, client: redis.Redis, spec: ModelSpec, worker_id: str | None = None):
        self.redis = client
        self.spec = spec
        self.id = worker_id or f"{spec.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.eventlog = EventLog(client)
        self.publisher = EventPublisher(self.eventlog)
        self.state = "loading"
        self.current_job: str | None = None
        self.incarnation = 0
        self.last_tokens_per_sec: float | None = None
        self.backend: Backend | None = None
        self.info: GGUFInfo | None = None
        self.backend_reason = ""
        self.started_at = time.time()
        self.stop_requested = False  # set on SIGTERM/SIGINT: finish the job, take no other
        self.unhealthy = False
        self._stop = threading.Event()
        self._state_changed = threading.Event()
        self.cancel = CancelWatcher(client)
        log_context.worker_id.set(self.id)
        self._heartbeat = threading.Thread(target=self._beat, name="inferq-heartbeat", daemon=True)

    # --- lifecycle -------------------------------------------------------------------
    def load(self) -> None:
        """Load the model (once, before any job) and start heartbeating."""
        self._heartbeat.start()
        start = time.perf_counter()
        size = os.path.getsize(self.spec.path)
        self.narrate(dict(actor=self.id, action="loading", target=self.spec.name,
                          human=f"Loading model {self.spec.name} ({size / 1e6:.1f} MB) on {self.spec.device}"))
        self.backend = load_backend(self.spec.backend, self.spec.path, self.spec.options)
        self.backend.gpu_index = gpu.parse_device(self.spec.device)
        self.info = self.backend.info
        self.backend_reason = self.backend.reason
        seconds = time.perf_counter() - start
        self.narrate(narration.model_loaded(self.id, self.spec.name, size,
                                            self.backend.name, self.spec.device, self.backend.context_length, seconds))
        self.set_state("idle")


    def shutdown(self) -> None:
        self._stop.set()
        self._state_changed.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(10)  # its last beat must not land after the removal below
        self.publisher.flush(5)
        try:
            registry.remove_worker(self.redis, self.id, self.spec.name)
        except redis.RedisError:
            pass

    def check_health(self) -> bool:
        """After a backend failure: keep serving if the model still works, else stop taking jobs."""
        if self.backend is not None and self.backend.health():
            return True
        log.error("worker %s: the model no longer decodes; taking no more jobs", self.id)
        self.unhealthy = True
        self.stop_requested = True
        self.set_state("unhealthy", self.current_job)
        return False

    def set_state(self, state: str, job_id: str | None = None) -> None:
        # The heartbeat thread writes it within a round trip: a job starting
        # (or the next one being taken) does not wait on Redis for it.
        self.state, self.current_job = state, job_id
        self._state_changed.set()

    def narrate(self, fields: dict, job_emitter=None) -> None:
        log.info("%s", fields["human"])  # one line per narration event: the story, never the prompt
        if job_emitter is not None:
            job_emitter.emit("narration", **fields)
        else:
            self.publisher.put(Narration(**fields))

    # --- heartbeat -------------------------------------------------------------------
    def worker_info(self) -> registry.WorkerInfo:
        b = self.backend
        return registry.WorkerInfo(
            id=self.id, host=socket.gethostname(), pid=os.getpid(), model=self.spec.name,
            backend=b.name if b else self.spec.backend, backend_reason=self.backend_reason,
            device=self.spec.device, state=self.state, current_job=self.current_job, incarnation=self.incarnation,
            last_tokens_per_sec=self.last_tokens_per_sec, vram_bytes=b.vram_bytes() if b else 0,
            context_length=b.context_length if b else 0, started_at=self.started_at)

    def model_info(self) -> registry.ModelInfo:
        b = self.backend
        return registry.ModelInfo(name=self.spec.name, context_length=b.context_length if b else 0,
                                  queue_depth=self.spec.queue_depth, backend=b.name if b else self.spec.backend)

    def _publish_heartbeat(self) -> None:
        try:
            registry.publish_heartbeat(self.redis, self.worker_info(), self.model_info())
        except redis.RedisError as exc:
            log.warning("worker %s: heartbeat failed: %s", self.id, exc)

    def _beat(self) -> None:
        next_tick = time.monotonic() + registry.HEARTBEAT_INTERVAL_S
        while True:
            self._state_changed.wait(max(0.0, next_tick - time.monotonic()))
            if self._stop.is_set():
                return
            self._state_changed.clear()
            self._publish_heartbeat()
            if time.monotonic() < next_tick:
                continue  # a state change, not the periodic tick
            next_tick = time.monotonic() + registry.HEARTBEAT_INTERVAL_S
            if self.backend is not None:
                try:
                    reaper.reap(self.redis, self.eventlog, self.spec.name, self.id)
                except redis.RedisError as exc:
                    log.warning("worker %s: could not check for lost jobs: %s", self.id, exc)
                except Exception:  # never let a surprise stop the heartbeats
                    log.exception("worker %s: checking for lost jobs failed", self.id)


def install(runtime: WorkerRuntime) -> None:
    global _current
    _current = runtime


def current() -> WorkerRuntime:
    if _current is None:
        raise RuntimeError("no model is loaded in this process: infer jobs run only in an inferq worker")
    return _current
