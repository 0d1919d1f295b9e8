"""A job's life on a worker: from the RQ job it took to a sequence to decode, and its story as events.

``prepare`` (the intake thread) checks what the job is, logs ``started``,
builds the prompt and the sequence the scheduler decodes (an ``infer`` job)
or the task it runs (an ``embed`` job, ``worker.embedding``), or ends the job
at once with a clear error: a template that refuses the conversation, a bad
grammar or schema, a feature this backend lacks are ``INVALID_REQUEST``; a
prompt too long for the context is ``CONTEXT_LENGTH_EXCEEDED``, found before
it is tokenized in full (``worker.prompt``). ``ended`` (the engine thread) tells how it ended as
events. ``logged`` (the publisher thread) closes RQ's books once the job's
terminal event is in the log — or forgets the job if the log refused this
worker's events (it lost the job's lease).

Workers run only inferq's own job functions: a job that names anything else
fails with a clear error, and nothing it names is ever imported.
"""
from __future__ import annotations

import logging
import os
import threading
import time
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
from queue_schema.lifecycle.eventlog import Appended
from queue_schema.lifecycle.leases import Acquired
from queue_schema.operations import EmbedOperation, InferOperation, Operation
from worker import embedding, grammar, narration
from worker.backends.base import SamplingParams
from worker.prompt import PromptBuilder, PromptTooLong
from worker.publisher import JobEmitter
from worker.scheduler import Ended, Sequence, Task

log = logging.getLogger(__name__)
LOG_PROMPTS = os.environ.get("INFERQ_LOG_PROMPTS") == "1"
JOB_FUNCTIONS = {INFER_FUNC: InferOperation, EMBED_FUNC: EmbedOperation}
_NAMES = {INFER_FUNC: "infer", EMBED_FUNC: "embed"}


@dataclass
class Record:
    """What the worker keeps about a job it holds, until its books are closed."""

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


class JobFailed(CodedError):
    """Raised in ``prepare`` after the job's ``error`` event was emitted."""


class Jobs:
    def __init__(self, runtime):
        self.rt = runtime
        self._records: dict[str, Record] = {}
        self._lock = threading.Lock()
        self._prompts: PromptBuilder | None = None  # once the model is loaded

    def held(self) -> list[str]:
        """The jobs whose leases this worker renews."""
        with self._lock:
            return list(self._records)

    def really_lost(self, job_ids) -> list[str]:
        """Of the jobs whose leases a renewal found gone, those this worker really lost. A job whose
        terminal event is already with the publisher released the lease itself when that event was
        appended (a renewal racing the append sees it gone); the append's own result settles it,
        and dropping it here would pop its record before its books are closed."""
        with self._lock:
            return [j for j in job_ids if j in self._records and not self._records[j].emitter.ended]

    def abandon(self, job_ids) -> None:
        """Stop renewing leases of jobs taken but not started (Redis failed between): the reaper
        sees them stand still and gives them back to their queues."""
        with self._lock:
            for job_id in job_ids:
                self._records.pop(job_id, None)
        self.rt.changed()

    def _forget(self, job_id: str) -> None:
        """No longer this worker's job (its record lists the jobs held: publish it)."""
        with self._lock:
            self._records.pop(job_id, None)
        self.rt.changed()

    # --- intake thread -------------------------------------------------------------------
    def prepare(self, taken: list[Acquired]) -> list[Sequence | Task]:
        """Sequences (and tasks) for the jobs just taken; the others end here, with their reasons logged."""
        rt = self.rt
        records = []
        for acq in taken:
            job = books.restore(rt.redis, acq.job_id, acq.fields)
            if acq.closed:
                self._close_ended(job)
                continue
            record = Record(job, JobEmitter(acq.job_id, rt.publisher.put, acq.next_seq))
            with self._lock:
                self._records[acq.job_id] = record
            records.append(record)
        if records:
            pipe = rt.redis.pipeline()
            for record in records:
                record.execution = books.start(pipe, record.job, rt.id)
            pipe.execute()
        out = []
        for record in records:
            token = log_context.job_id.set(record.job.id)
            try:
                out.append(self._sequence(record))
            except JobFailed:
                pass
            except Exception as exc:  # a bug: still end the stream so no client waits forever
                log.exception("job %s: could not be prepared", record.job.id)
                self._fail(record, ErrorCode.INFERENCE_FAILED, f"internal error in the worker: "
                           f"{exc.__class__.__name__}", retriable=True, raise_=False)
            finally:
                log_context.job_id.reset(token)
        return out

    def _sequence(self, record: Record) -> Sequence | Task:
        rt, job, emitter = self.rt, record.job, record.emitter
        kind = JOB_FUNCTIONS.get(job.func_name)
        if kind is None:
            self._fail(record, ErrorCode.INVALID_REQUEST,
                       f"inferq workers run only inferq's own jobs; this one names {job.func_name!r}")
        try:
            op = kind.model_validate(job.kwargs.get("payload"))
        except (ValidationError, ValueError, TypeError, AttributeError) as exc:
            self._fail(record, ErrorCode.INVALID_REQUEST,
                       f"the job's payload is not a valid {_NAMES[job.func_name]} operation "
                       f"({exc.__class__.__name__})")
        record.op = op
        # Both on the fleet's clock (queue_schema.lifecycle.clock): this host's own may be far from the API's.
        now = clock.now_ms(rt.redis)
        submitted = job.meta.get("submitted_ms") or now
        record.wait_ms = wait_ms = max(0, now - int(submitted))
        emitter.emit("started", model=rt.spec.name, worker=rt.id, queue_wait_ms=wait_ms)
        if op.ttl_s is not None and wait_ms > op.ttl_s * 1000:
            self._fail(record, ErrorCode.TIMEOUT, f"the job waited {wait_ms / 1000:.1f} s in the queue, "
                       f"longer than its ttl_s={op.ttl_s}", retriable=True)
        backend = rt.backend
        missing = [c for c in op.needs() if c not in backend.capabilities]
        if missing:  # admission checked the model's record; this worker's backend may differ
            self._fail(record, ErrorCode.INVALID_REQUEST, f"this worker's backend ({backend.name}) cannot do "
                       f"{', '.join(missing)}")
        cancelled = rt.cancel.watch(job.id)
        if cancelled.is_set():
            rt.cancel.unwatch(job.id)
            record.outcome, record.summary = "cancelled", {"tokens_out": 0, "stop_reason": "cancelled"}
            emitter.emit("end", tokens_out=0, decode_time_ms=0, stop_reason="cancelled", text="")
            raise JobFailed()
        if isinstance(op, EmbedOperation):
            return self._embed_task(record, op, cancelled)
        prompt = self._prompt(record, op)
        rt.narrate(narration.job_started(rt.id, job.id, rt.spec.name, wait_ms, len(prompt)), emitter)
        try:
            rules = grammar.of(op)
            params = SamplingParams(op.temperature, op.top_k, op.top_p, op.repetition_penalty, op.seed,
                                    op.presence_penalty, op.frequency_penalty, self._logit_bias(op), rules)
            sampler = backend.sampler(params, prompt)
        except ValueError as exc:  # a schema the converter refuses, a grammar llama.cpp cannot parse
            self._fail(record, ErrorCode.INVALID_REQUEST, str(exc))
        return Sequence(job.id, prompt, params, op.max_tokens, op.stop, time.monotonic() + op.timeout_s,
                        cancelled, emitter, context=record, logprobs=op.logprobs, sampler=sampler)

    def _builder(self) -> PromptBuilder:
        if self._prompts is None:
            self._prompts = PromptBuilder(self.rt.backend)
        return self._prompts

    def _prompt(self, record: Record, op: InferOperation) -> list[int]:
        backend = self.rt.backend
        budget = backend.context_length - op.max_tokens
        try:
            if op.prompt is not None:
                text = op.prompt
                prompt = self._builder().from_text(text, budget)
            else:
                template = backend.info.chat_template if backend.info else None
                prompt, text = self._builder().from_messages([m.model_dump() for m in op.messages], template,
                                                             budget)
        except PromptTooLong as exc:
            size = "" if exc.exact else " (refused before it was tokenized in full)"
            self._fail(record, ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                       f"prompt is {exc} and max_tokens is {op.max_tokens}: more than the model's context of "
                       f"{backend.context_length} tokens{size}")
        except TemplateError as exc:  # the template refused the conversation (roles, a system message)
            self._fail(record, ErrorCode.INVALID_REQUEST, f"the model's chat template refused the messages: {exc}")
        except Exception as exc:  # a tokenizer failure
            self._fail(record, ErrorCode.INVALID_REQUEST, f"cannot build the prompt: {exc}")
        if LOG_PROMPTS:  # opt-in only: prompts are user data
            log.info("prompt: %r", text)
        return prompt

    def _logit_bias(self, op: InferOperation) -> tuple[tuple[int, float], ...]:
        vocab = self.rt.backend.vocab_size
        bias = tuple((int(token), float(value)) for token, value in op.logit_bias.items())
        unknown = [t for t, _ in bias if t >= vocab]
        if unknown:
            raise ValueError(f"logit_bias names token {unknown[0]}, past this model's vocabulary of {vocab} tokens")
        return bias

    def _embed_task(self, record: Record, op: EmbedOperation, cancelled) -> Task:
        rt, backend = self.rt, self.rt.backend
        seqs, room = backend.embed_limits()
        inputs = op.inputs
        if len(inputs) * backend.embedding_length > embedding.MAX_FLOATS:
            self._fail(record, ErrorCode.INVALID_REQUEST, f"{len(inputs)} inputs of {backend.embedding_length} "
                       f"dimensions are more than one job returns ({embedding.MAX_FLOATS} floats); split them")
        tokens = []
        for n, item in enumerate(inputs):
            if isinstance(item, str):
                try:
                    ids = self._builder().from_text(item, room)
                except PromptTooLong as exc:
                    self._fail(record, ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"input {n} is {exc}: more than the "
                               f"{room} tokens one input may have on this model")
            else:
                ids = list(item)
                if len(ids) > room or max(ids) >= backend.vocab_size:
                    self._fail(record, ErrorCode.INVALID_REQUEST if len(ids) <= room else
                               ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"input {n}: {len(ids)} token ids, at most "
                               f"{room}, each below {backend.vocab_size}")
            tokens.append(ids)
        rt.narrate(narration.job_started(rt.id, record.job.id, rt.spec.name, record.wait_ms, sum(map(len, tokens))),
                   record.emitter)
        return embedding.EmbedTask(record.job.id, tokens, time.monotonic() + op.timeout_s, cancelled,
                                   record.emitter, context=record)

    def _fail(self, record: Record, code: ErrorCode, message: str, retriable: bool = False,
              raise_: bool = True) -> None:
        rt = self.rt
        rt.cancel.unwatch(record.job.id)
        rt.narrate(narration.job_failed(rt.id, record.job.id, code.value, message), record.emitter)
        record.emitter.emit("error", code=code.value, message=message, retriable=retriable)
        record.outcome, record.reason = "failed", f"{code.value}: {message}"
        log.info("job %s failed: %s %s", record.job.id, code.value, message)
        if raise_:
            raise JobFailed()

    def _close_ended(self, job: Job) -> None:
        """A job taken whose log had already ended (it was cancelled as it was taken): settled, if nobody has."""
        self.rt.ending.settle(job.id, worker_name=self.rt.id)

    # --- engine thread -------------------------------------------------------------------
    def ended(self, seq: Sequence | Task, end: Ended) -> None:
        rt, record, emitter = self.rt, seq.context, seq.emitter
        rt.cancel.unwatch(seq.job_id)
        record.tokens, record.first_token_ms = end.tokens_out, end.first_token_ms
        if end.reason == "dropped":  # the lease is someone else's: not a word more from us
            self._forget(seq.job_id)
            return
        if end.reason == "aborted":
            if end.tokens_out == 0 and books.may_requeue(record.job):
                record.requeue = True
                rt.narrate(dict(actor=rt.id, action="requeue", target=seq.job_id,
                                human=f"Worker {rt.id} stopped before the first token; the job goes back "
                                      "to the front of its queue"), emitter)
                emitter.emit("queued", position=0, queue=record.job.origin)
            else:
                self._fail(record, ErrorCode.WORKER_LOST, f"worker {rt.id} was stopped at once (a second "
                           f"SIGTERM or Ctrl-C) after {end.tokens_out} tokens; the job can be submitted again",
                           retriable=True, raise_=False)
            return
        if end.reason == "overflow":
            self._fail(record, ErrorCode.INFERENCE_FAILED, "Redis was unreachable for too long to keep this "
                       "job's events; the job can be submitted again", retriable=True, raise_=False)
            return
        if end.reason == "failed":
            oom = isinstance(end.error, MemoryError)
            self._fail(record, ErrorCode.VRAM_OOM if oom else ErrorCode.INFERENCE_FAILED,
                       f"{'out of memory while decoding' if oom else 'the backend failed'}: {end.error}",
                       retriable=True, raise_=False)
            return
        if end.reason == "timeout":
            self._fail(record, ErrorCode.TIMEOUT, f"the job ran past timeout_s={record.op.timeout_s} after "
                       f"{end.tokens_out} {'embeddings' if isinstance(seq, Task) else 'tokens'}", raise_=False)
            return
        if end.reason == "grammar_slow":  # its grammar is too costly to sample: the others go on
            self._fail(record, ErrorCode.INVALID_REQUEST, f"{end.error} (after {end.tokens_out} tokens)",
                       raise_=False)
            return
        if end.reason == "rejected":  # its grammar allowed no token: the request cannot be met
            self._fail(record, ErrorCode.INVALID_REQUEST, f"{end.error} (after {end.tokens_out} tokens)",
                       raise_=False)
            return
        if isinstance(seq, Task):
            self._task_ended(seq, end)
            return
        rt.last_tokens_per_sec = end.tokens_per_sec
        emitter.emit("metrics", tokens_per_sec=round(end.tokens_per_sec, 2), vram_bytes=rt.vram_bytes,
                     prompt_tokens=len(seq.prompt), tokens_out=end.tokens_out, cached_tokens=seq.reused)
        rt.narrate(narration.job_finished(rt.id, seq.job_id, end.tokens_out, end.decode_time_ms / 1000,
                                          end.tokens_per_sec, end.reason), emitter)
        emitter.emit("end", tokens_out=end.tokens_out, decode_time_ms=end.decode_time_ms, stop_reason=end.reason,
                     text=end.text)
        record.outcome = "cancelled" if end.reason == "cancelled" else "finished"
        record.summary = {"tokens_out": end.tokens_out, "stop_reason": end.reason,
                          "prompt_tokens": len(seq.prompt), "cached_prompt_tokens": seq.reused,
                          "decode_time_ms": end.decode_time_ms, "first_token_ms": end.first_token_ms,
                          "queue_wait_ms": record.wait_ms}
        log.info("job %s on %s: %d tokens, %.1f tok/s, %s", seq.job_id, rt.id, end.tokens_out,
                 end.tokens_per_sec, end.reason)

    def _task_ended(self, task: Task, end: Ended) -> None:
        rt, record, emitter = self.rt, task.context, task.emitter
        record.tokens = 0  # no token generated: the counters of generated tokens stay as they are
        reason = "cancelled" if end.reason == "cancelled" else "done"
        tokens = getattr(task, "tokens", 0)
        emitter.emit("metrics", tokens_per_sec=round(tokens / max(end.decode_time_ms, 1) * 1000, 2),
                     vram_bytes=rt.vram_bytes, prompt_tokens=tokens, tokens_out=0, cached_tokens=0)
        rt.narrate(narration.embed_finished(rt.id, task.job_id, end.tokens_out, tokens, end.decode_time_ms / 1000,
                                            reason), emitter)
        emitter.emit("end", tokens_out=0, decode_time_ms=end.decode_time_ms, stop_reason=reason, text="")
        record.outcome = "cancelled" if reason == "cancelled" else "finished"
        record.summary = {"tokens_out": 0, "stop_reason": reason, "embeddings": end.tokens_out,
                          "prompt_tokens": tokens, "decode_time_ms": end.decode_time_ms,
                          "queue_wait_ms": record.wait_ms}
        log.info("job %s on %s: %d embeddings, %d tokens, %s", task.job_id, rt.id, end.tokens_out, tokens, reason)

    # --- publisher thread ----------------------------------------------------------------
    def logged(self, job_id: str, status: Appended, terminal_written: bool) -> None:
        if status != Appended.OK:
            self.rt.scheduler.drop(job_id)
            self.rt.cancel.unwatch(job_id)
            self._forget(job_id)
            return
        if not terminal_written:
            return
        with self._lock:
            record = self._records.pop(job_id, None)
        if record is not None:
            self._settle(record)
            self.rt.changed()

    def _settle(self, record: Record) -> None:
        """The job's terminal event is in its log: settle its end (queue_schema.lifecycle.ending), then add what
        only this worker knows of the run (tokens, timings)."""
        rt, job = self.rt, record.job
        try:
            failed = record.outcome == "failed"
            if not rt.ending.settle(job.id, record.emitter.terminal, summary=None if failed else record.summary,
                                    reason=record.reason if failed else None, worker_name=rt.id,
                                    execution=record.execution):
                return
            ttft = record.first_token_ms
            stats.record_run(rt.redis, rt.spec.name, record.tokens, None if ttft is None else ttft / 1000,
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
                books.give_back(self.rt.redis, self.rt.leases, job, self.rt.id, job.origin, self.rt.spec.name)
            except redis.RedisError as exc:  # the lease stays ours and stands still: the reaper requeues it
                log.warning("job %s: could not give it back: %s", job.id, exc)
            self._forget(job.id)
