"""A job's life on a worker: from the RQ job it took to a sequence to decode, and its story as events.

Three threads meet here, each through one door:

- ``prepare`` (the intake thread) checks what the job is, logs ``started``,
  builds the prompt and the sequence the scheduler decodes (an ``infer``
  job) or the task it runs (an ``embed`` job, ``worker.embedding``), and
  posts it to the engine's inbox; or it ends the job at once with a clear
  error: a template that refuses the conversation, a bad grammar or schema,
  a feature this backend lacks are ``INVALID_REQUEST``; a prompt too long
  for the context is ``CONTEXT_LENGTH_EXCEEDED``, found before it is
  tokenized in full (``worker.prompt``).
- ``on_step`` (the engine thread) turns what a scheduler step returned (a
  ``StepOutput``) into events, and hands the step's events to the publisher
  at once: one write per step. How a job finished is a ``FinishReason``,
  told as ``end`` or as the ``error`` the table ``_FAILURES`` gives it.
- ``logged`` (the publisher thread) settles a job once its terminal event is
  in the log (queue_schema.lifecycle.ending), or, if the log refused this
  worker's events (it lost the job's lease), drops it from the engine.

Workers run only inferq's own job functions: a job that names anything else
fails with a clear error, and nothing it names is ever imported.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from jinja2.exceptions import TemplateError
from pydantic import ValidationError
from rq.executions import Execution
from rq.job import Job

from queue_schema import log_context
from queue_schema.errors import CodedError, ErrorCode
from queue_schema.lifecycle import books, clock, stats
from queue_schema.lifecycle.admission import EMBED_FUNC, INFER_FUNC
from queue_schema.lifecycle.ending import Ending
from queue_schema.lifecycle.eventlog import Appended
from queue_schema.lifecycle.leases import Acquired, Leases, generation
from queue_schema.operations import EmbedOperation, InferOperation, Operation
from worker import chat_template, embedding, grammar, narration
from worker.backends.base import Backend, SamplingParams
from worker.cancel_watcher import CancelWatcher
from worker.inbox import Drop, FinishReason, Inbox
from worker.prompt import PromptBuilder, PromptTooLong
from worker.publisher import EventPublisher, JobEmitter
from worker.scheduler import Finished, Sequence, StepOutput, Task, TokenOut

log = logging.getLogger(__name__)
LOG_PROMPTS = os.environ.get("INFERQ_LOG_PROMPTS") == "1"
JOB_FUNCTIONS = {INFER_FUNC: InferOperation, EMBED_FUNC: EmbedOperation}
_NAMES = {INFER_FUNC: "infer", EMBED_FUNC: "embed"}


@dataclass
class Record:
    """What the worker keeps about a job it holds, until its end is settled."""

    job: Job
    emitter: JobEmitter
    execution: Execution | None = None
    op: Operation | None = None
    wait_ms: int | None = None
    outcome: str = "failed"  # finished | cancelled | failed
    reason: str = ""  # for RQ's failed registry
    summary: dict = field(default_factory=dict)
    tokens: int = 0
    first_token_ms: int | None = None
    started: float = field(default_factory=time.monotonic)
    requeue: bool = False  # given back on an abort, once its last events are written

    @property
    def owner(self) -> str:
        """The lease owner string this take of the job writes as (``<worker>#<generation>``)."""
        return self.emitter.owner or ""


class JobFailed(CodedError):
    """Raised in ``prepare`` after the job's ``error`` event was made."""


# How each ending that is not an ``end`` is told: (code, retriable, message). ``fin`` is the scheduler's Finished.
def _unit(fin: Finished) -> str:
    return "embeddings" if isinstance(fin.item, Task) else "tokens"


_FAILURES: dict[FinishReason, Callable[[Record, Finished, str], tuple[ErrorCode, bool, str]]] = {
    FinishReason.TIMEOUT: lambda rec, fin, who: (
        ErrorCode.TIMEOUT, False, f"the job ran past timeout_s={rec.op.timeout_s} after {fin.tokens_out} "
                                  f"{_unit(fin)}"),
    FinishReason.FAILED: lambda rec, fin, who: (
        (ErrorCode.VRAM_OOM, True, f"out of memory while decoding: {fin.error}") if isinstance(fin.error, MemoryError)
        else (ErrorCode.INFERENCE_FAILED, True, f"the backend failed: {fin.error}")),
    FinishReason.REJECTED: lambda rec, fin, who: (
        ErrorCode.INVALID_REQUEST, False, f"{fin.error} (after {fin.tokens_out} tokens)"),
    FinishReason.GRAMMAR_SLOW: lambda rec, fin, who: (
        ErrorCode.INVALID_REQUEST, False, f"{fin.error} (after {fin.tokens_out} tokens)"),
    FinishReason.OVERFLOW: lambda rec, fin, who: (
        ErrorCode.INFERENCE_FAILED, True, "Redis was unreachable for too long to keep this job's events; the job "
                                          "can be submitted again"),
    FinishReason.ABORTED: lambda rec, fin, who: (
        ErrorCode.WORKER_LOST, True, f"worker {who} was stopped at once (a second SIGTERM or Ctrl-C) after "
                                     f"{fin.tokens_out} tokens; the job can be submitted again"),
}


class Jobs:
    def __init__(self, *, worker_id: str, model: str, client: redis.Redis, backend: Backend,
                 publisher: EventPublisher, inbox: Inbox, cancel: CancelWatcher, ending: Ending, leases: Leases,
                 changed: Callable[[], None], vram_bytes: int = 0, chat_template: str | None = None):
        self.id, self.model, self.redis, self.backend = worker_id, model, client, backend
        self.publisher, self.inbox, self.cancel, self.ending, self.leases = publisher, inbox, cancel, ending, leases
        self.changed = changed  # the jobs held changed: the worker's record says so soon
        self.vram_bytes = vram_bytes
        self.chat_template = chat_template  # the Jinja source chat is rendered with (None: the plain fallback)
        self.last_tokens_per_sec: float | None = None
        self._records: dict[str, Record] = {}
        self._lock = threading.Lock()
        self._prompts = PromptBuilder(backend)

    def held(self) -> list[tuple[str, str]]:
        """The jobs whose leases this worker renews, with the owner strings it holds them as."""
        with self._lock:
            return [(job_id, r.owner) for job_id, r in self._records.items()]

    def really_lost(self, job_ids) -> list[str]:
        """Of the jobs whose leases a renewal found gone, those this worker really lost. A job whose
        terminal event is already with the publisher is that append's to settle (a renewal racing the
        append, after a Redis stall, may see the lease gone before the settle): dropping it here would
        pop its record before its end is settled."""
        with self._lock:
            return [j for j in job_ids if j in self._records and not self._records[j].emitter.ended]

    def abandon(self, job_ids) -> None:
        """Stop renewing leases of jobs taken but not started (Redis failed between): the reaper
        sees them stand still and gives them back to their queues."""
        with self._lock:
            for job_id in job_ids:
                self._records.pop(job_id, None)
        self.changed()

    def _forget(self, job_id: str, record: Record | None = None) -> None:
        """Drop the job's record (only ``record``'s, when given: the job may have been taken again since)."""
        with self._lock:
            if record is None or self._records.get(job_id) is record:
                self._records.pop(job_id, None)
        self.changed()

    def current(self, record: Record) -> bool:
        with self._lock:
            return self._records.get(record.job.id) is record

    def _narrate(self, record: Record, fields: dict, events: list) -> None:
        log.info("%s", fields["human"])  # one line per narration event: the story, never the prompt
        events.append(record.emitter.make("narration", **fields))

    # --- intake thread -------------------------------------------------------------------
    def prepare(self, taken: list[Acquired]) -> list[Sequence | Task]:
        """Sequences (and tasks) for the jobs just taken, for the engine's inbox; the others end here, with
        their reasons logged."""
        records = []
        for acq in taken:
            job = books.restore(self.redis, acq.job_id, acq.fields)
            if acq.closed:  # its log ended as it was taken (a cancel): settled, if nobody has
                self.ending.settle(job.id, worker_name=self.id)
                continue
            record = Record(job, JobEmitter(acq.job_id, acq.next_seq, acq.owner))
            with self._lock:
                stale = self._records.get(acq.job_id)
                self._records[acq.job_id] = record
            if stale is not None:  # taken again after a reaper gave it back: the earlier take is fenced already
                log.warning("job %s: taken again as %s; its earlier take (%s) stops", acq.job_id, acq.owner,
                            stale.owner)
                self.inbox.post(Drop(acq.job_id, stale.owner))
            records.append(record)
        if not records:
            return []
        pipe = self.redis.pipeline()
        for record in records:
            record.execution = books.start(pipe, record.job, self.id)
        pipe.execute()
        ready = []
        for record in records:
            token = log_context.job_id.set(record.job.id)
            events: list = []
            item = None
            try:
                item = self._item(record, events)
            except JobFailed:
                pass
            except Exception as exc:  # a bug: still end the stream so no client waits forever
                log.exception("job %s: could not be prepared", record.job.id)
                self._fail(record, ErrorCode.INFERENCE_FAILED, f"internal error in the worker: "
                           f"{exc.__class__.__name__}", events, retriable=True)
            finally:
                log_context.job_id.reset(token)
            self.publisher.put_many(events)  # before the engine's events for the job: the log keeps order
            if item is not None:
                ready.append(item)
        return ready

    def _item(self, record: Record, events: list) -> Sequence | Task:
        job, emitter = record.job, record.emitter
        kind = JOB_FUNCTIONS.get(job.func_name)
        if kind is None:
            self._fail(record, ErrorCode.INVALID_REQUEST,
                       f"inferq workers run only inferq's own jobs; this one names {job.func_name!r}", events,
                       raise_=True)
        try:
            op = kind.model_validate(job.kwargs.get("payload"))
        except (ValidationError, ValueError, TypeError, AttributeError) as exc:
            self._fail(record, ErrorCode.INVALID_REQUEST, f"the job's payload is not a valid {_NAMES[job.func_name]} "
                       f"operation ({exc.__class__.__name__})", events, raise_=True)
        record.op = op
        # Both on the fleet's clock (queue_schema.lifecycle.clock): this host's own may be far from the API's.
        now = clock.now_ms(self.redis)
        submitted = job.meta.get("submitted_ms") or now
        record.wait_ms = wait_ms = max(0, now - int(submitted))
        events.append(emitter.make("started", model=self.model, worker=self.id, queue_wait_ms=wait_ms,
                                   tool_format=self._tool_format(op), run=generation(record.owner) or None))
        if op.ttl_s is not None and wait_ms > op.ttl_s * 1000:
            self._fail(record, ErrorCode.TIMEOUT, f"the job waited {wait_ms / 1000:.1f} s in the queue, longer than "
                       f"its ttl_s={op.ttl_s}", events, retriable=True, raise_=True)
        backend = self.backend
        missing = [c for c in op.needs() if c not in backend.capabilities]
        if missing:  # admission checked the model's record; this worker's backend may differ
            self._fail(record, ErrorCode.INVALID_REQUEST, f"this worker's backend ({backend.name}) cannot do "
                       f"{', '.join(missing)}", events, raise_=True)
        if self.cancel.watch(job.id):  # cancelled before it got here
            self.cancel.unwatch(job.id)
            record.outcome, record.summary = "cancelled", {"tokens_out": 0, "stop_reason": "cancelled"}
            events.append(emitter.make("end", tokens_out=0, decode_time_ms=0, stop_reason="cancelled", text=""))
            raise JobFailed()
        if isinstance(op, EmbedOperation):
            return self._embed_task(record, op, events)
        prompt = self._prompt(record, op, events)
        self._narrate(record, narration.job_started(self.id, job.id, self.model, wait_ms, len(prompt)), events)
        try:
            rules = grammar.of(op)
            params = SamplingParams(op.temperature, op.top_k, op.top_p, op.repetition_penalty, op.seed,
                                    op.presence_penalty, op.frequency_penalty, self._logit_bias(op), rules)
            sampler = backend.sampler(params, prompt)
        except ValueError as exc:  # a schema the converter refuses, a grammar llama.cpp cannot parse
            self._fail(record, ErrorCode.INVALID_REQUEST, str(exc), events, raise_=True)
        return Sequence(job.id, prompt, params, op.max_tokens, op.stop, time.monotonic() + op.timeout_s,
                        context=record, logprobs=op.logprobs, sampler=sampler)

    def _tool_format(self, op) -> str | None:
        """The call syntax the job's output is read with (by the API, from the log): none without tools."""
        if not isinstance(op, InferOperation) or not op.calls_tools:
            return None
        return "json" if op.must_call else chat_template.tool_support(self.chat_template).format

    def _prompt(self, record: Record, op: InferOperation, events: list) -> list[int]:
        backend = self.backend
        budget = backend.context_length - op.max_tokens
        try:
            if op.prompt is not None:
                text = op.prompt
                prompt = self._prompts.from_text(text, budget)
            else:
                tools = [t.model_dump(exclude_none=True) for t in op.tools] if op.calls_tools else None
                prompt, text = self._prompts.from_messages([m.model_dump(exclude_none=True) for m in op.messages],
                                                           self.chat_template, budget, tools)
        except PromptTooLong as exc:
            size = "" if exc.exact else " (refused before it was tokenized in full)"
            self._fail(record, ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"prompt is {exc} and max_tokens is {op.max_tokens}: "
                       f"more than the model's context of {backend.context_length} tokens{size}", events, raise_=True)
        except TemplateError as exc:  # the template refused the conversation (roles, a system message)
            self._fail(record, ErrorCode.INVALID_REQUEST, f"the model's chat template refused the messages: {exc}",
                       events, raise_=True)
        except Exception as exc:  # a tokenizer failure
            self._fail(record, ErrorCode.INVALID_REQUEST, f"cannot build the prompt: {exc}", events, raise_=True)
        if LOG_PROMPTS:  # opt-in only: prompts are user data
            log.info("prompt: %r", text)
        return prompt

    def _logit_bias(self, op: InferOperation) -> tuple[tuple[int, float], ...]:
        vocab = self.backend.vocab_size
        bias = tuple((int(token), float(value)) for token, value in op.logit_bias.items())
        unknown = [t for t, _ in bias if t >= vocab]
        if unknown:
            raise ValueError(f"logit_bias names token {unknown[0]}, past this model's vocabulary of {vocab} tokens")
        return bias

    def _embed_task(self, record: Record, op: EmbedOperation, events: list) -> Task:
        backend = self.backend
        seqs, room = backend.embed_limits()
        inputs = op.inputs
        if len(inputs) * backend.embedding_length > embedding.MAX_FLOATS:
            self._fail(record, ErrorCode.INVALID_REQUEST, f"{len(inputs)} inputs of {backend.embedding_length} "
                       f"dimensions are more than one job returns ({embedding.MAX_FLOATS} floats); split them",
                       events, raise_=True)
        tokens = []
        for n, item in enumerate(inputs):
            if isinstance(item, str):
                try:
                    ids = self._prompts.from_text(item, room)
                except PromptTooLong as exc:
                    self._fail(record, ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"input {n} is {exc}: more than the "
                               f"{room} tokens one input may have on this model", events, raise_=True)
            else:
                ids = list(item)
                if len(ids) > room or max(ids) >= backend.vocab_size:
                    self._fail(record, ErrorCode.INVALID_REQUEST if len(ids) <= room else
                               ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"input {n}: {len(ids)} token ids, at most "
                               f"{room}, each below {backend.vocab_size}", events, raise_=True)
            tokens.append(ids)
        self._narrate(record, narration.job_started(self.id, record.job.id, self.model, record.wait_ms,
                                                    sum(map(len, tokens))), events)
        return embedding.EmbedTask(record.job.id, tokens, time.monotonic() + op.timeout_s, context=record)

    def _fail(self, record: Record, code: ErrorCode, message: str, events: list, retriable: bool = False,
              raise_: bool = False) -> None:
        if self.current(record):  # a take of the job the worker lost must not unwatch the one it holds
            self.cancel.unwatch(record.job.id)
        self._narrate(record, narration.job_failed(self.id, record.job.id, code.value, message), events)
        events.append(record.emitter.make("error", code=code.value, message=message, retriable=retriable))
        record.outcome, record.reason = "failed", f"{code.value}: {message}"
        log.info("job %s failed: %s %s", record.job.id, code.value, message)
        if raise_:
            raise JobFailed()

    # --- engine thread -------------------------------------------------------------------
    def on_step(self, out: StepOutput) -> None:
        """A scheduler step's outputs as events, handed to the publisher in one go."""
        events: list = []
        for item in out.outputs:
            record = item.item.context
            if isinstance(item, TokenOut):
                events.append(record.emitter.make("token", t=item.text, i=item.index, **(item.logprobs or {})))
            elif isinstance(item, embedding.EmbeddingOut):
                events.append(record.emitter.make("embedding", index=item.index, embedding=item.embedding,
                                                  dims=item.dims, tokens=item.tokens))
            elif isinstance(item, Finished):
                self._finished(item, record, events)
        self.publisher.put_many(events)

    def _finished(self, fin: Finished, record: Record, events: list) -> None:
        job_id = record.job.id
        if self.current(record):
            self.cancel.unwatch(job_id)
        record.tokens, record.first_token_ms = fin.tokens_out, fin.first_token_ms
        if fin.reason == FinishReason.DROPPED:  # the lease is someone else's: not a word more from us
            self._forget(job_id, record)
            return
        if fin.reason == FinishReason.ABORTED and fin.tokens_out == 0 and books.may_requeue(record.job):
            record.requeue = True
            self._narrate(record, dict(actor=self.id, action="requeue", target=job_id,
                                       human=f"Worker {self.id} stopped before the first token; the job goes back "
                                             "to the front of its queue"), events)
            events.append(record.emitter.make("queued", position=0, queue=record.job.origin))
            return
        if not fin.reason.ran:
            code, retriable, message = _FAILURES[fin.reason](record, fin, self.id)
            self._fail(record, code, message, events, retriable=retriable)
            return
        if isinstance(fin.item, Task):
            self._task_ended(fin, record, events)
            return
        seq = fin.item
        self.last_tokens_per_sec = fin.tokens_per_sec
        events.append(record.emitter.make("metrics", tokens_per_sec=round(fin.tokens_per_sec, 2),
                                          vram_bytes=self.vram_bytes, prompt_tokens=len(seq.prompt),
                                          tokens_out=fin.tokens_out, cached_tokens=seq.reused))
        self._narrate(record, narration.job_finished(self.id, job_id, fin.tokens_out, fin.decode_time_ms / 1000,
                                                     fin.tokens_per_sec, fin.reason.value), events)
        events.append(record.emitter.make("end", tokens_out=fin.tokens_out, decode_time_ms=fin.decode_time_ms,
                                          stop_reason=fin.reason.value, text=fin.text))
        record.outcome = "cancelled" if fin.reason == FinishReason.CANCELLED else "finished"
        record.summary = {"tokens_out": fin.tokens_out, "stop_reason": fin.reason.value,
                          "prompt_tokens": len(seq.prompt), "cached_prompt_tokens": seq.reused,
                          "decode_time_ms": fin.decode_time_ms, "first_token_ms": fin.first_token_ms,
                          "queue_wait_ms": record.wait_ms}
        log.info("job %s on %s: %d tokens, %.1f tok/s, %s", job_id, self.id, fin.tokens_out, fin.tokens_per_sec,
                 fin.reason.value)

    def _task_ended(self, fin: Finished, record: Record, events: list) -> None:
        task = fin.item
        record.tokens = 0  # no token generated: the counters of generated tokens stay as they are
        reason = "cancelled" if fin.reason == FinishReason.CANCELLED else "done"
        tokens = getattr(task, "tokens", 0)
        events.append(record.emitter.make("metrics", tokens_per_sec=round(tokens / max(fin.decode_time_ms, 1) * 1000, 2),
                                          vram_bytes=self.vram_bytes, prompt_tokens=tokens, tokens_out=0,
                                          cached_tokens=0))
        self._narrate(record, narration.embed_finished(self.id, task.job_id, fin.tokens_out, tokens,
                                                       fin.decode_time_ms / 1000, reason), events)
        events.append(record.emitter.make("end", tokens_out=0, decode_time_ms=fin.decode_time_ms, stop_reason=reason,
                                          text=""))
        record.outcome = "cancelled" if reason == "cancelled" else "finished"
        record.summary = {"tokens_out": 0, "stop_reason": reason, "embeddings": fin.tokens_out,
                          "prompt_tokens": tokens, "decode_time_ms": fin.decode_time_ms,
                          "queue_wait_ms": record.wait_ms}
        log.info("job %s on %s: %d embeddings, %d tokens, %s", task.job_id, self.id, fin.tokens_out, tokens, reason)

    # --- publisher thread ----------------------------------------------------------------
    def logged(self, job_id: str, owner: str | None, status: Appended, terminal_written: bool) -> None:
        """What the log said of the events written as ``owner`` (None: whichever take the worker holds)."""
        with self._lock:
            record = self._records.get(job_id)
        current = record is not None and owner in (None, record.owner)
        if status != Appended.OK:  # the log refused these events: that take of the job is no longer ours
            self.inbox.post(Drop(job_id, owner))
            if current:
                self.cancel.unwatch(job_id)
                self._forget(job_id, record)
            return
        if not terminal_written or not current:
            return
        with self._lock:
            record = self._records.pop(job_id, None)
        if record is not None:
            self._settle(record)
            self.changed()

    def _settle(self, record: Record) -> None:
        """The job's terminal event is in its log: settle its end (queue_schema.lifecycle.ending), then add what
        only this worker knows of the run (tokens, timings)."""
        job = record.job
        try:
            failed = record.outcome == "failed"
            if not self.ending.settle(job.id, record.emitter.terminal, summary=None if failed else record.summary,
                                      reason=record.reason if failed else None, worker_name=self.id,
                                      execution=record.execution):
                return
            ttft = record.first_token_ms
            stats.record_run(self.redis, self.model, record.tokens, None if ttft is None else ttft / 1000,
                             None if record.wait_ms is None else record.wait_ms / 1000,
                             time.monotonic() - record.started if record.outcome == "finished" else None)
        except redis.RedisError as exc:  # the reaper settles what a writer left unsettled
            log.warning("job %s: could not settle its end: %s", job.id, exc)

    def requeue_aborted(self) -> None:
        """After an abort's events are written: give back the jobs that streamed nothing."""
        with self._lock:
            records = [r for r in self._records.values() if r.requeue]
        for record in records:
            job = record.job
            try:
                books.count_requeue(job)
                books.give_back(self.redis, self.leases, job, record.owner, job.origin, self.model)
            except redis.RedisError as exc:  # the lease stays ours and stands still: the reaper requeues it
                log.warning("job %s: could not give it back: %s", job.id, exc)
            self._forget(job.id, record)
