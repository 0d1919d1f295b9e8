"""A worker process's parts, and the threads around its engine.

One process holds one model for its whole life. Threads:

- the engine (the thread that calls ``serve``): scheduler steps
  (``worker.scheduler``), each one's outputs told as events by the job layer
  (``worker.jobs``);
- intake: takes jobs while slots are free and posts them to the engine's
  inbox (``worker.intake``, ``worker.inbox``);
- publisher: writes events to Redis (``worker.publisher``);
- renewal: renews the leases of the jobs it holds, every second
  (``worker.renewal``);
- heartbeat: re-publishes the worker's record every two seconds, and within a quarter second of a change
  (``queue_schema.lifecycle.registry``) and sees the publisher overflowing;
- reaper: looks for jobs other processes lost (``queue_schema.lifecycle.reaper``);
- watchdog: a decode step stuck past its bound (``worker.watchdog``);
- cancel: listens for cancels (``worker.cancel_watcher``).

What other threads ask of the engine goes through its inbox: a job to run, a
cancel, a job this worker lost, "end everything now" (a second SIGTERM, or
Redis away too long).
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
from queue_schema.errors import ConfigError
from queue_schema.events import Narration
from queue_schema.lifecycle import clock, connection, events_url, log_format, registry
from queue_schema.lifecycle import views as job_views
from queue_schema.lifecycle.ending import Ending
from queue_schema.lifecycle.eventlog import EventLog
from queue_schema.lifecycle.leases import Leases
from queue_schema.lifecycle.reaper import Reaper
from queue_schema.settings import DEFAULTS, Settings
from worker import chat_template, gpu, narration
from worker.backends import Backend, LoadOptions, load_backend
from worker.cancel_watcher import CancelWatcher
from worker.gguf_meta import GGUFInfo
from worker.inbox import FinishReason, Inbox, StopAll
from worker.jobs import Jobs
from worker.publisher import EventPublisher
from worker.renewal import LeaseRenewal
from worker.scheduler import Scheduler
from worker.watchdog import StepWatchdog

log = logging.getLogger(__name__)
CHANGE_COALESCE_S = 0.01
CHANGE_GAP_S = 0.25  # the record says a change within this; short jobs back to back share a write


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
    chat_template: str | None = None  # --chat-template: a built-in name or a Jinja file, over the file's own


class WorkerRuntime:
    def __init__(self, client: redis.Redis, spec: ModelSpec, worker_id: str | None = None,
                 listen_client: redis.Redis | None = None, settings: Settings = DEFAULTS,
                 events: redis.Redis | None = None, events_url: str | None = None):
        """``listen_client`` serves the connections that block (cancel pub/sub); it needs no socket timeout.
        ``events``: the job logs' store, where that is not ``client`` (INFERQ_EVENTS_URL)."""
        self.redis = client
        self.spec = spec
        self.id = worker_id or f"{spec.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.settings = settings
        self.events_store = connection.store_identity(events_url)  # checked against the fleet's at load
        self.eventlog = EventLog(events if events is not None else client, ttl_s=settings.job_ttl_s, queue=client)
        self.leases = Leases(client, self.eventlog)
        self.ending = Ending(client, self.eventlog)
        self.inbox = Inbox()
        self.publisher = EventPublisher(self.eventlog, writer=self.id, on_result=self._logged)
        self.cancel = CancelWatcher(listen_client or client, self.inbox)
        self.reaper = Reaper(client, f"{self.id}/reaper", self.eventlog, settings)
        self.watchdog = StepWatchdog(self, spec.stuck_step_s)
        self.jobs: Jobs | None = None  # once the model is loaded
        self.scheduler: Scheduler | None = None
        self.renewal: LeaseRenewal | None = None
        self.state = "loading"
        self.backend: Backend | None = None
        self.info: GGUFInfo | None = None
        self.template: chat_template.TemplateChoice | None = None
        self.backend_reason = ""
        self.started_at = time.time()
        self.stop_admitting = False  # SIGTERM: finish the running jobs, take no more
        self.unhealthy = False
        self.vram_bytes = 0
        self._overflow_told = False
        self._rq_worker: Worker | None = None
        self._stop = threading.Event()
        self._changed = threading.Event()  # jobs started or ended: publish the record soon
        self._published = 0.0  # when the record was last written (monotonic)
        log_context.set_process_worker(self.id)
        self._heartbeat = threading.Thread(target=self._beat, name="inferq-heartbeat", daemon=True)

    # --- lifecycle -------------------------------------------------------------------
    def load(self) -> None:
        """Load the model (once, before any job) and start heartbeating."""
        events_url.claim(self.redis, self.events_store, self.id, clock.now_ms(self.redis))
        log_format.check(self.redis, self.id, self.eventlog.redis)
        self._heartbeat.start()
        start = time.perf_counter()
        size = os.path.getsize(self.spec.path)
        self.narrate(dict(actor=self.id, action="loading", target=self.spec.name,
                          human=f"Loading model {self.spec.name} ({size / 1e6:.1f} MB) on {self.spec.device}"))
        self.backend = load_backend(self.spec.backend, self.spec.path, self.spec.options)
        self.backend.gpu_index = gpu.parse_device(self.spec.device)
        self.info = self.backend.info
        self.template = self._choose_template()
        self.backend_reason = self.backend.reason
        self.vram_bytes = self.backend.vram_bytes()
        self.scheduler = Scheduler(self.backend, self.inbox, on_failure=self.check_health,
                                   grammar_limit_s=self.spec.grammar_limit_s)
        # The worker's record lists the jobs it holds (Jobs), not the slots: Jobs says when that changes.
        self.jobs = Jobs(worker_id=self.id, model=self.spec.name, client=self.redis, backend=self.backend,
                         publisher=self.publisher, inbox=self.inbox, cancel=self.cancel, ending=self.ending,
                         leases=self.leases, changed=self.changed, vram_bytes=self.vram_bytes,
                         chat_template=self.template.source)
        self.renewal = LeaseRenewal(self.id, self.leases, self.jobs)
        seconds = time.perf_counter() - start
        self.narrate(narration.model_loaded(self.id, self.spec.name, size, self.backend.name, self.spec.device,
                                            self.backend.context_length, seconds))
        self._register_with_rq()
        self.renewal.start()
        self.reaper.start()
        self.watchdog.start()
        self.set_state("idle")

    def _choose_template(self) -> chat_template.TemplateChoice:
        """The template chat is rendered with; refuses to start if a live worker of the model renders another
        way (one model, two prompts: the same conversation would get different answers by worker)."""
        b = self.backend
        choice = chat_template.choose(self.spec.chat_template, self.info.chat_template if self.info else None)
        # Its control tokens become single tokens only on a backend that parses them in text.
        if choice.source and b.parses_specials:
            b.capabilities = b.capabilities | {"chat_template"}
        else:
            b.capabilities = b.capabilities - {"chat_template"}
        for peer in registry.live_workers(self.redis):
            if peer.model == self.spec.name and peer.id != self.id and peer.chat_template_digest != choice.digest \
                    and peer.state != "loading":
                raise ConfigError(f"workers of model {self.spec.name} render chat with template {peer.chat_template} "
                                  f"({peer.chat_template_digest}); this one would use {choice.name} ({choice.digest}): "
                                  f"start it with the same --chat-template")
        if choice.source is None:
            log.warning("model %s has no chat template (its GGUF carries none): chat messages are rendered as plain "
                        "'Role: text' lines; --chat-template chatml|llama3|gemma|mistral|PATH sets one",
                        self.spec.name)
        return choice

    def serve(self) -> None:
        """Decode until asked to stop and nothing is left running (call from the main thread)."""
        scheduler, inbox = self.scheduler, self.inbox
        while True:
            out = scheduler.step()
            if out is not None:
                self.jobs.on_step(out)
                continue
            if self.stop_admitting and not scheduler.busy():
                return
            inbox.wake.wait(0.2)
            inbox.wake.clear()

    def request_stop(self) -> None:
        """First SIGTERM/Ctrl-C: take no more jobs; the running ones finish."""
        if not self.stop_admitting:
            log.info("worker %s: stopping after its %d running jobs", self.id, len(self.scheduler.running()))
        self.stop_admitting = True
        self.set_state("stopping")
        self.inbox.wake.set()

    def abort(self) -> None:
        """Second SIGTERM/Ctrl-C: end every running job now (given back if it streamed nothing)."""
        log.warning("worker %s: stopping now", self.id)
        self.stop_admitting = True
        self.inbox.post(StopAll(FinishReason.ABORTED))

    def shutdown(self) -> None:
        self.reaper.stop()
        self.watchdog.stop()
        if self.renewal is not None:
            self.renewal.stop()
        self.publisher.flush(10)
        if self.jobs is not None:
            self.jobs.requeue_aborted()
        self._stop.set()
        self._changed.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(10)  # its last beat must not land after the removal below
        try:
            registry.remove_worker(self.redis, self.id, self.spec.name)
            events_url.leave(self.redis, self.events_store, self.id)
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
        """Its jobs changed: the record is published within CHANGE_GAP_S (a few ms when it was not just written)."""
        self._changed.set()

    def narrate(self, fields: dict) -> None:
        """The worker's own story (no job's): logged, and told on the operators' feed."""
        log.info("%s", fields["human"])  # one line per narration event: the story, never the prompt
        self.publisher.put(Narration(**fields))

    def _logged(self, job_id, owner, status, terminal_written) -> None:
        if self.jobs is not None:
            self.jobs.logged(job_id, owner, status, terminal_written)

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
        running = [job_id for job_id, _ in self.jobs.held()] if self.jobs else []  # taken, not yet ended in the log
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
            last_tokens_per_sec=self.jobs.last_tokens_per_sec if self.jobs else None, vram_bytes=self.vram_bytes,
            context_length=b.context_length if b else 0, capabilities=sorted(b.capabilities) if b else [],
            chat_template=self.template.name if self.template else "none",
            chat_template_digest=self.template.digest if self.template else "none", started_at=self.started_at)

    def model_info(self) -> records.ModelInfo:
        """The model's record; its ``capabilities`` are what admission checks jobs against."""
        b = self.backend
        capabilities = sorted(b.capabilities) if b else []
        return records.ModelInfo(name=self.spec.name, context_length=b.context_length if b else 0,
                                 queue_depth=self.spec.queue_depth, backend=b.name if b else self.spec.backend,
                                 slots=b.slots if b else 1, capabilities=capabilities,
                                 chat_template=self.template.name if self.template else "none",
                                 embedding_length=b.embedding_length if "embeddings" in capabilities else 0)

    def _beat(self) -> None:
        next_info = 0.0
        while not self._stop.is_set():
            self._changed.wait(max(0.0, min(next_info, time.monotonic() + 1.0) - time.monotonic()))
            if self._stop.is_set():
                return
            try:
                if self._changed.is_set():
                    self._changed.clear()
                    next_info = 0.0  # the record changed: publish it now
                    # One write for the jobs that change together, and at most one per CHANGE_GAP_S: each is
                    # about ten commands, which short jobs back to back paid twice each (busy, then idle).
                    time.sleep(max(CHANGE_COALESCE_S, self._published + CHANGE_GAP_S - time.monotonic()))
                self._check_overflow()
                if time.monotonic() >= next_info:
                    next_info = time.monotonic() + registry.HEARTBEAT_INTERVAL_S
                    self._rq_heartbeat(bool(self.publish_record().jobs))
                    events_url.renew(self.redis, self.events_store, self.id, clock.now_ms(self.redis))
            except events_url.EventsStoreMismatch as exc:  # the fleet moved its logs while this one was away
                log.error("worker %s: %s; stopping", self.id, exc)
                self.request_stop()
            except redis.RedisError as exc:
                log.warning("worker %s: heartbeat failed: %s", self.id, exc)
            except Exception:  # never let a surprise stop the heartbeats
                log.exception("worker %s: heartbeat failed", self.id)

    def _check_overflow(self) -> None:
        """Redis away so long that the held events pass the publisher's bound: end the running jobs (their
        errors are written once Redis is back), once per overflow."""
        if self.publisher.overflowing and not self._overflow_told and self.scheduler is not None:
            log.error("worker %s: %d events wait for Redis; ending the running jobs", self.id, self.publisher.pending)
            self.inbox.post(StopAll(FinishReason.OVERFLOW))
            self._overflow_told = True
        elif not self.publisher.overflowing:
            self._overflow_told = False

    def publish_record(self) -> records.WorkerInfo:
        """Write the worker's record (state, the jobs it holds) now."""
        info = self.worker_info()
        registry.publish_heartbeat(self.redis, info, self.model_info())
        self._published = time.monotonic()
        return info
