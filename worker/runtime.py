"""A worker process's state: its loaded model, its scheduler and the threads around them.

One process holds one model for its whole life. Threads:

- the engine (the thread that calls ``serve``): the scheduler's decode loop;
- intake: takes jobs while slots are free (``worker.intake``);
- publisher: writes events to Redis (``worker.publisher``);
- heartbeat: renews the leases of the jobs it holds every second and
  re-publishes the worker's record every two (``queue_schema.lifecycle.registry``);
- reaper: looks for jobs other processes lost (``queue_schema.lifecycle.reaper``);
- cancel: listens for cancels (``worker.cancel_watcher``).
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
from rq import Worker
from rq.serializers import JSONSerializer

from queue_schema import log_context, records
from queue_schema.events import Narration
from queue_schema.lifecycle import registry
from queue_schema.lifecycle import views as job_views
from queue_schema.lifecycle.ending import Ending
from queue_schema.lifecycle.eventlog import Appended, EventLog
from queue_schema.lifecycle.leases import Leases
from queue_schema.lifecycle.reaper import Reaper
from queue_schema.settings import DEFAULTS, Settings
from worker import gpu, narration
from worker.backends import Backend, LoadOptions, load_backend
from worker.cancel_watcher import CancelWatcher
from worker.gguf_meta import GGUFInfo
from worker.jobs import Jobs
from worker.publisher import EventPublisher
from worker.scheduler import Scheduler
from worker.watchdog import StepWatchdog

log = logging.getLogger(__name__)
LEASE_RENEW_S = 1.0
CHANGE_COALESCE_S = 0.01


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    backend: str = "auto"
    options: LoadOptions = field(default_factory=LoadOptions)
    device: str = "cpu"
    queue_depth: int = 1000
    grammar_limit_s: float = 1.0  # one grammar sample slower than this ends its job (worker.scheduler)
    stuck_step_s: float = 60.0  # a decode step running longer hands its jobs on (worker.watchdog)


class WorkerRuntime:
    def __init__(self, client: redis.Redis, spec: ModelSpec, worker_id: str | None = None,
                 listen_client: redis.Redis | None = None, settings: Settings = DEFAULTS):
        """``listen_client`` serves the connections that block (cancel pub/sub); it needs no socket timeout."""
        self.redis = client
        self.spec = spec
        self.id = worker_id or f"{spec.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.settings = settings
        self.eventlog = EventLog(client, ttl_s=settings.job_ttl_s)
        self.leases = Leases(client)
        self.jobs = Jobs(self)
        self.publisher = EventPublisher(self.eventlog, writer=self.id, on_result=self.jobs.logged)
        self.cancel = CancelWatcher(listen_client or client)
        self.ending = Ending(client, self.eventlog)
        self.reaper = Reaper(client, f"{self.id}/reaper", self.eventlog, settings)
        self.watchdog = StepWatchdog(self, spec.stuck_step_s)
        self.state = "loading"
        self.last_tokens_per_sec: float | None = None
        self.backend: Backend | None = None
        self.scheduler: Scheduler | None = None
        self.info: GGUFInfo | None = None
        self.backend_reason = ""
        self.started_at = time.time()
        self.stop_admitting = False  # SIGTERM: finish the running jobs, take no more
        self.unhealthy = False
        self.vram_bytes = 0
        self._rq_worker: Worker | None = None
        self._stop = threading.Event()
        self._changed = threading.Event()  # jobs started or ended: publish the record soon
        log_context.set_process_worker(self.id)
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
        self.vram_bytes = self.backend.vram_bytes()
        # The worker's record lists the jobs it holds (Jobs), not the slots: Jobs says when that changes.
        self.scheduler = Scheduler(self.backend, self.jobs.ended, self.publisher.put_many,
                                   on_failure=self.check_health, grammar_limit_s=self.spec.grammar_limit_s)
        seconds = time.perf_counter() - start
        self.narrate(narration.model_loaded(self.id, self.spec.name, size, self.backend.name, self.spec.device,
                                            self.backend.context_length, seconds))
        self._register_with_rq()
        self.reaper.start()
        self.watchdog.start()
        self.set_state("idle")

    def serve(self) -> None:
        """Decode until asked to stop and nothing is left running (call from the main thread)."""
        self.scheduler.run(until=lambda: self.stop_admitting)

    def request_stop(self) -> None:
        """First SIGTERM/Ctrl-C: take no more jobs; the running ones finish."""
        if not self.stop_admitting:
            log.info("worker %s: stopping after its %d running jobs", self.id, len(self.scheduler.running()))
        self.stop_admitting = True
        self.set_state("stopping")
        self.scheduler.wake()

    def abort(self) -> None:
        """Second SIGTERM/Ctrl-C: end every running job now (given back if it streamed nothing)."""
        log.warning("worker %s: stopping now", self.id)
        self.stop_admitting = True
        self.scheduler.end_all = "aborted"
        self.scheduler.wake()

    def shutdown(self) -> None:
        self.reaper.stop()
        self.watchdog.stop()
        self.publisher.flush(10)
        self.jobs.requeue_aborted()
        self._stop.set()
        self._changed.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(10)  # its last beat must not land after the removal below
        try:
            registry.remove_worker(self.redis, self.id, self.spec.name)
            if self._rq_worker is not None:
                self._rq_worker.register_death()
        except redis.RedisError:
            pass
        if self.backend is not None:
            self.backend.close()

    def check_health(self, slot: int = 0) -> bool:
        """After a backend failure: keep serving if the model still works, else stop taking jobs.
        Runs on the engine thread, probing in ``slot``, which the scheduler gives it free."""
        if self.backend is not None and self.backend.health(slot):
            return True
        log.error("worker %s: the model no longer decodes; taking no more jobs", self.id)
        self.unhealthy = True
        self.stop_admitting = True
        self.set_state("unhealthy")
        return False

    def set_state(self, state: str) -> None:
        self.state = state
        self._changed.set()

    def changed(self) -> None:
        """Its jobs changed: the record is published within a few ms."""
        self._changed.set()

    def narrate(self, fields: dict, job_emitter=None) -> None:
        log.info("%s", fields["human"])  # one line per narration event: the story, never the prompt
        if job_emitter is not None:
            job_emitter.emit("narration", **fields)
        else:
            self.publisher.put(Narration(**fields))

    # --- RQ's view of this worker --------------------------------------------------------
    def _register_with_rq(self) -> None:
        """rq-dashboard lists RQ workers: register one under this worker's id (it never runs RQ's loop)."""
        self._rq_worker = Worker(job_views.model_queues(self.redis, self.spec.name), name=self.id,
                                 connection=self.redis, serializer=JSONSerializer)
        self._rq_worker.register_birth()

    def _rq_heartbeat(self, busy: bool) -> None:
        w = self._rq_worker
        if w is None:
            return
        if not self.redis.exists(w.key):  # Redis restarted without it
            w.register_birth()
        pipe = self.redis.pipeline(transaction=False)
        w.heartbeat(timeout=int(registry.WORKER_TTL_S) + 30, pipeline=pipe)
        w.set_state("busy" if busy else "idle", pipeline=pipe)
        pipe.execute()

    # --- heartbeat -------------------------------------------------------------------
    def worker_info(self) -> records.WorkerInfo:
        b, s = self.backend, self.scheduler
        running = self.jobs.held()  # taken and not yet ended in the log
        sizes = s.batch_sizes[-64:] if s else []
        state = self.state
        if state in ("idle", "busy"):
            state = "busy" if running else "idle"
        return records.WorkerInfo(
            id=self.id, host=socket.gethostname(), pid=os.getpid(), model=self.spec.name,
            backend=b.name if b else self.spec.backend, backend_reason=self.backend_reason,
            device=self.spec.device, state=state, slots=b.slots if b else 1, jobs=running,
            current_job=running[0] if running else None,
            batch_size=round(sum(sizes) / len(sizes), 2) if sizes else 0.0,
            last_tokens_per_sec=self.last_tokens_per_sec, vram_bytes=self.vram_bytes,
            context_length=b.context_length if b else 0, capabilities=sorted(b.capabilities) if b else [],
            started_at=self.started_at)

    def model_info(self) -> records.ModelInfo:
        """The model's record; its ``capabilities`` are what admission checks jobs against."""
        b = self.backend
        capabilities = sorted(b.capabilities) if b else []
        return records.ModelInfo(name=self.spec.name, context_length=b.context_length if b else 0,
                                  queue_depth=self.spec.queue_depth, backend=b.name if b else self.spec.backend,
                                  slots=b.slots if b else 1, capabilities=capabilities,
                                  embedding_length=b.embedding_length if "embeddings" in capabilities else 0)

    def _beat(self) -> None:
        next_info = next_renew = 0.0
        while not self._stop.is_set():
            self._changed.wait(max(0.0, min(next_info, next_renew) - time.monotonic()))
            if self._stop.is_set():
                return
            try:
                if self._changed.is_set():
                    self._changed.clear()
                    next_info = 0.0  # the record changed: publish it now
                    time.sleep(CHANGE_COALESCE_S)  # one write for the jobs that change together
                if time.monotonic() >= next_renew:
                    next_renew = time.monotonic() + LEASE_RENEW_S
                    self._renew_leases()
                if self.publisher.overflowing and self.scheduler is not None and not self.scheduler.end_all:
                    log.error("worker %s: %d events wait for Redis; ending the running jobs", self.id,
                              self.publisher.pending)
                    self.scheduler.end_all = "overflow"
                elif self.scheduler is not None and self.scheduler.end_all == "overflow" \
                        and not self.scheduler.running():
                    self.scheduler.end_all = None
                if time.monotonic() >= next_info:
                    next_info = time.monotonic() + registry.HEARTBEAT_INTERVAL_S
                    self._rq_heartbeat(bool(self.publish_record().jobs))
            except redis.RedisError as exc:
                log.warning("worker %s: heartbeat failed: %s", self.id, exc)
            except Exception:  # never let a surprise stop the heartbeats
                log.exception("worker %s: heartbeat failed", self.id)

    def publish_record(self) -> records.WorkerInfo:
        """Write the worker's record (state, the jobs it holds) now."""
        info = self.worker_info()
        registry.publish_heartbeat(self.redis, info, self.model_info())
        return info

    def _renew_leases(self) -> None:
        held = self.jobs.held()
        for job_id in self.jobs.really_lost(self.leases.renew(self.id, held)):
            log.warning("worker %s: lost the lease of job %s; stopping it", self.id, job_id)
            self.jobs.logged(job_id, Appended.FENCED, False)
