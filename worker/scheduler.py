"""The scheduler: every running job's next token in one decode call per step (continuous batching).

This is inferq's one token loop, for every backend. A backend has ``slots``
sequences; each step the scheduler

1. admits waiting jobs into free slots (new jobs join between steps: no
   waiting for a batch to drain), reusing the longest prefix of the new
   prompt that any slot already holds in the cache (a shared system prompt,
   a conversation that grew by a turn);
2. ends sequences that were cancelled, ran past their deadline, or whose
   lease this worker lost;
3. builds one decode: the next token of every decoding sequence first, then
   chunks of prompts up to a token budget sized so a step takes about
   ``STEP_TARGET_S`` (a long prompt is prefilled over several steps while
   the others keep streaming, and a cancel during a prefill lands within a
   step);
4. samples each sequence's next token (in the backend, in C), turns token
   bytes into safe text (``TextAssembler``: whole UTF-8 characters, stop
   strings held back), adds log-probabilities for the sequences that asked,
   and hands the whole step's events to the publisher at once.

Work that is not a token loop — an embed job (``worker.embedding``) — runs
here too, on the engine thread that owns the model's contexts: one batch of
it per step, between two decodes, so a long embed job never stalls the
streams. It takes one of the worker's job slots while it runs.

One sequence failing to build (bad template, too long, bad grammar) never
reaches here; a decode call failing ends the sequences in that call only, and
a grammar that allows no token ends its own sequence only.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from queue_schema.errors import ErrorCode, InferqError
from worker import logprobs
from worker.backends.base import Backend, Chunk, NoTokenAllowed, SamplingParams, TokenSampler
from worker.publisher import JobEmitter
from worker.text_assembler import TextAssembler

log = logging.getLogger(__name__)
STEP_TARGET_S = 0.05
MIN_PREFILL_CHUNK = 16
GRAMMAR_LIMIT_S = 1.0


@dataclass
class Sequence:
    """One job's decoding: what the scheduler needs, and what it reports when the job ends."""

    job_id: str
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stops: Seq[str]
    deadline: float  # time.monotonic() past which the job ends with TIMEOUT
    cancelled: threading.Event
    emitter: JobEmitter
    context: object = None  # the job layer's own state, untouched here
    logprobs: int | None = None  # top alternatives on each token event; None: no logprobs
    sampler: TokenSampler | None = None  # made by the job layer (it checks the grammar), else at admission
    # --- filled in while it runs ---
    slot: int = -1
    reused: int = 0  # prompt tokens found in the cache
    at: int = 0  # next prompt token to evaluate
    pending: int | None = None  # sampled, not yet evaluated
    count: int = 0  # tokens generated
    text: str = ""
    assembler: TextAssembler = field(default_factory=TextAssembler)
    admitted_at: float = 0.0
    first_at: float | None = None
    last_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.at < len(self.prompt)


@dataclass
class Ended:
    """How a sequence ended, for the job layer to tell as events."""

    # max_tokens | eos | stop_sequence | cancelled | timeout | done (a task): it ran; failed: a decode call
    # raised; rejected: its grammar allowed no token; grammar_slow: its grammar took too long to sample a
    # token; dropped: the worker lost its lease; aborted: the worker is stopping now; overflow: Redis away
    # too long
    reason: str
    text: str
    tokens_out: int
    decode_time_ms: int
    first_token_ms: int | None
    tokens_per_sec: float
    error: BaseException | None = None


class GrammarTooSlow(InferqError):
    def __init__(self, seconds: float, limit_s: float):
        super().__init__(ErrorCode.INVALID_REQUEST, f"the grammar took {seconds:.3f} s to sample one token, more "
                         f"than the worker's {limit_s:g} s; simplify it (fewer alternatives that match the same text)")


@dataclass
class Slot:
    index: int
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values this slot holds
    seq: Sequence | None = None
    used_at: float = 0.0


class Task:
    """Work for the engine thread that is not a token loop (an embed job), done a step at a time."""

    job_id: str
    cancelled: threading.Event
    deadline: float
    emitter: JobEmitter
    context: object = None
    count: int = 0  # outputs so far (embeddings sent)
    started_at: float = 0.0

    def step(self, backend: Backend, budget: int) -> bool:
        """Do the next piece (one decode call of about ``budget`` tokens); True when the whole job is done."""
        raise NotImplementedError


class Scheduler:
    def __init__(self, backend: Backend, on_end: Callable[[Sequence, Ended], None],
                 publish: Callable[[list], None], on_failure: Callable[[int], object] = lambda slot: None,
                 grammar_limit_s: float = GRAMMAR_LIMIT_S):
        self.backend = backend
        self.on_end = on_end  # called on the engine thread; may emit the job's last events
        self._publish = publish  # a step's events, at once
        self._on_failure = on_failure  # the backend failed: probe it, once, in the free slot given
        self.slots = [Slot(i) for i in range(backend.slots)]
        self._incoming: queue.SimpleQueue[Sequence | Task] = queue.SimpleQueue()
        self._tasks: list[Task] = []  # running, oldest first (engine thread only)
        self._waiting = 0  # submitted, not yet admitted
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.slot_freed = threading.Event()
        self._dropped: set[str] = set()
        self._prefill_s_per_token: float | None = None
        self._out: list = []  # the step's events
        self.steps = 0
        self.last_step_at = time.monotonic()
        self.batch_sizes: list[int] = []  # sequences per decode call, last few hundred steps
        self.end_all: str | None = None  # end every running job now, for this reason ("aborted", "overflow")
        # A grammar can be costly to apply to every token of the vocabulary; one sample that takes longer
        # than this ends that job alone (the others in the step are sampled as usual).
        self.grammar_limit_s = grammar_limit_s
        self.decoding_since: float | None = None  # monotonic start of the decode call running now, if any

    # --- other threads -----------------------------------------------------------------
    def submit(self, item: Sequence | Task) -> None:
        with self._lock:
            self._waiting += 1
        self._incoming.put(item)
        self._wake.set()

    def capacity(self) -> int:
        """Jobs it can take now (a running task counts as a job)."""
        with self._lock:
            busy = sum(1 for s in self.slots if s.seq is not None) + len(self._tasks)
            return len(self.slots) - busy - self._waiting

    def drop(self, job_id: str) -> None:
        """Stop a job without another event: this worker no longer holds it."""
        with self._lock:
            self._dropped.add(job_id)
        self._wake.set()

    def running(self) -> list[str]:
        return [s.seq.job_id for s in self.slots if s.seq is not None] + [t.job_id for t in self._tasks]

    def busy(self) -> bool:
        with self._lock:
            return self._waiting > 0 or bool(self._tasks) or any(s.seq is not None for s in self.slots)

    def wake(self) -> None:
        self._wake.set()

    # --- the engine thread -------------------------------------------------------------
    def run(self, until: Callable[[], bool]) -> None:
        """Step until ``until()`` is true and nothing is running or waiting."""
        while True:
            self.last_step_at = time.monotonic()
            if not self.step():
                if until() and not self.busy():
                    return
                self._wake.wait(0.2)
                self._wake.clear()

    def step(self) -> bool:
        """One scheduling step; False if there was nothing to do."""
        self._admit()
        active = [s.seq for s in self.slots if s.seq is not None]
        if not active and not self._tasks:
            return False
        self._end_stopped(active)
        if self._tasks:
            self._run_task()
        chunks, plan = self._plan()
        if chunks:
            started = time.perf_counter()
            self.decoding_since = time.monotonic()  # the watchdog's: a call stuck in C cannot be interrupted
            try:
                rows = self.backend.decode(chunks)
            except Exception as exc:  # noqa: BLE001 - the job layer decides what it means
                log.exception("decode failed for %d sequences", len(plan))
                for seq in plan:
                    self._end(seq, "failed", exc)
                self._probe()
            else:
                self._learn(chunks, time.perf_counter() - started)
                self._sample(plan, chunks, rows)
            finally:
                self.decoding_since = None
        self._flush()
        self.steps += 1
        return True

    def _admit(self) -> None:
        while True:
            free = [s for s in self.slots if s.seq is None]
            if len(free) <= len(self._tasks):  # a task holds a job slot, not a cache slot
                return
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                self._waiting -= 1
            if isinstance(item, Sequence):
                self._place(item, free)
            else:
                item.started_at = time.perf_counter()
                item.emitter.sink = self._out.append
                with self._lock:
                    self._tasks.append(item)

    def _place(self, seq: Sequence, free: list[Slot]) -> None:
        """Put ``seq`` in the free slot that saves the most prefill (copying a busy slot's prefix if longer)."""
        limit = len(seq.prompt) - 1  # at least one token is evaluated, for the logits
        # Ties go to the slot used last: idle slots' caches stay in the unified KV cache, and every
        # decode attends over all occupied cells, so spreading one client over every slot slows it.
        best_free = max(free, key=lambda s: (_common(s.cached, seq.prompt, limit), s.used_at))
        keep = _common(best_free.cached, seq.prompt, limit)
        slot = best_free
        if self.backend.can_share_prefix:
            donor = max(self.slots, key=lambda s: _common(s.cached, seq.prompt, limit))
            shared = _common(donor.cached, seq.prompt, limit)
            if donor is not best_free and shared > keep:
                slot = min(free, key=lambda s: s.used_at)  # overwrite the coldest cache
                self.backend.share(donor.index, slot.index, shared)
                slot.cached = donor.cached[:shared]
                keep = shared
        self.backend.forget(slot.index, keep)
        del slot.cached[keep:]
        seq.slot, seq.reused, seq.at = slot.index, keep, keep
        seq.admitted_at = time.perf_counter()
        seq.assembler = TextAssembler(seq.stops)
        if seq.sampler is None:
            seq.sampler = self.backend.sampler(seq.params, seq.prompt)
        seq.emitter.sink = self._out.append
        slot.seq, slot.used_at = seq, time.monotonic()

    def _end_stopped(self, active: list[Sequence]) -> None:
        with self._lock:
            dropped, self._dropped = self._dropped, set()
        now = time.monotonic()

        def why(item: Sequence | Task) -> str | None:
            if item.job_id in dropped:
                return "dropped"
            if self.end_all:
                return self.end_all
            if item.cancelled.is_set():
                return "cancelled"
            return "timeout" if now > item.deadline else None

        for seq in active:
            if reason := why(seq):
                self._end(seq, reason)
        for task in list(self._tasks):
            if reason := why(task):
                self._end_task(task, reason)

    def _run_task(self) -> None:
        task = self._tasks[0]
        try:
            done = task.step(self.backend, self._prefill_budget())
        except Exception as exc:  # noqa: BLE001 - the job layer decides what it means
            log.exception("job %s: its task failed", task.job_id)
            self._end_task(task, "failed", exc)
            self._probe()
            return
        if done:
            self._end_task(task, "done")
        elif len(self._tasks) > 1:  # round robin between tasks, one piece each per step
            with self._lock:
                self._tasks.append(self._tasks.pop(0))

    def _end_task(self, task: Task, reason: str, error: BaseException | None = None) -> None:
        with self._lock:
            if task not in self._tasks:
                return
            self._tasks.remove(task)
        elapsed = time.perf_counter() - task.started_at
        self.on_end(task, Ended(reason, "", task.count, int(elapsed * 1000), None,
                                task.count / elapsed if elapsed > 0 else 0.0, error))
        self.slot_freed.set()

    def _plan(self) -> tuple[list[Chunk], list[Sequence]]:
        chunks, plan = [], []
        for slot in self.slots:
            seq = slot.seq
            if seq is not None and seq.pending is not None:
                chunks.append(Chunk(slot.index, [seq.pending], len(slot.cached), True))
                plan.append(seq)
        budget = min(self.backend.options.batch_size - len(chunks), self._prefill_budget())
        for seq in sorted((s.seq for s in self.slots if s.seq is not None and s.seq.prefilling),
                          key=lambda q: q.admitted_at):
            if budget <= 0:
                break
            n = min(budget, len(seq.prompt) - seq.at)
            chunks.append(Chunk(seq.slot, seq.prompt[seq.at:seq.at + n], seq.at, seq.at + n == len(seq.prompt)))
            plan.append(seq)
            budget -= n
        return chunks, plan

    def _prefill_budget(self) -> int:
        if self._prefill_s_per_token is None:
            return 64
        return max(MIN_PREFILL_CHUNK, int(STEP_TARGET_S / self._prefill_s_per_token))

    def _learn(self, chunks: list[Chunk], seconds: float) -> None:
        tokens = sum(len(c.tokens) for c in chunks)
        self.batch_sizes.append(len(chunks))
        if len(self.batch_sizes) > 512:
            del self.batch_sizes[:256]
        if tokens >= MIN_PREFILL_CHUNK:
            per_token = seconds / tokens
            old = self._prefill_s_per_token
            self._prefill_s_per_token = per_token if old is None else 0.7 * old + 0.3 * per_token

    def _sample(self, plan: list[Sequence], chunks: list[Chunk], rows: list[int | None]) -> None:
        backend = self.backend
        for seq, chunk, row in zip(plan, chunks, rows):
            slot = self.slots[seq.slot]
            slot.cached.extend(chunk.tokens)
            if seq.pending is not None:
                seq.pending = None
            else:
                seq.at += len(chunk.tokens)
            if row is None:
                continue
            began = time.perf_counter()
            try:
                token = seq.sampler.sample(row)
            except NoTokenAllowed as exc:
                # With an EOS in the vocabulary a finished grammar allows it; without one, it is done.
                self._end(seq, "eos" if backend.eos_token_id < 0 else "rejected", exc)
                continue
            now = time.perf_counter()
            if seq.params.grammar is not None and now - began > self.grammar_limit_s:
                self._end(seq, "grammar_slow", GrammarTooSlow(now - began, self.grammar_limit_s))
                continue
            seq.first_at = seq.first_at or now
            seq.last_at = now
            if backend.is_eog(token):
                self._end(seq, "eos")
                continue
            text = seq.assembler.push(backend.token_bytes(token))
            if seq.logprobs is not None:  # one event per token, its text possibly empty
                seq.emitter.emit("token", t=text, i=seq.count, **logprobs.fields(backend, row, token, seq.logprobs))
            elif text:
                seq.emitter.emit("token", t=text, i=seq.count)
            seq.count += 1
            if seq.assembler.stopped:
                self._end(seq, "stop_sequence")
            elif seq.count >= seq.max_tokens or len(slot.cached) + 1 >= backend.context_length:
                self._end(seq, "max_tokens")  # the context is full: as far as it can go
            else:
                seq.pending = token

    def _end(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        slot = self.slots[seq.slot]
        if slot.seq is not seq:
            return
        if reason in ("max_tokens", "eos", "stop_sequence", "cancelled", "timeout"):
            tail = seq.assembler.finish()
            if tail:
                seq.emitter.emit("token", t=tail, i=max(seq.count - 1, 0))
        if reason == "failed":
            self.backend.forget(slot.index, 0)  # what a failed decode left in the cache is unknown
            slot.cached.clear()
        slot.seq = None
        slot.used_at = time.monotonic()
        seq.sampler.close()
        elapsed = time.perf_counter() - seq.admitted_at
        if seq.count > 1 and seq.last_at > seq.first_at:
            rate = (seq.count - 1) / (seq.last_at - seq.first_at)
        else:
            rate = seq.count / elapsed if elapsed > 0 else 0.0
        first = None if seq.first_at is None else int((seq.first_at - seq.admitted_at) * 1000)
        self.on_end(seq, Ended(reason, seq.assembler.text, seq.count, int(elapsed * 1000), first, rate, error))
        self.slot_freed.set()

    def _probe(self) -> None:
        """After a failed call, one health probe, in a slot no sequence holds: the probe empties it, and
        a slot with a running sequence or a cached prefix would be left with a cache it no longer has."""
        free = next((s for s in self.slots if s.seq is None), None)
        if free is not None:
            free.cached.clear()
            self._on_failure(free.index)

    def _flush(self) -> None:
        if self._out:  # emitters append to this very list: empty it, never replace it
            out = self._out[:]
            self._out.clear()
            self._publish(out)


def _common(cached: list[int], prompt: list[int], limit: int) -> int:
    n = min(len(cached), limit)
    i = 0
    while i < n and cached[i] == prompt[i]:
        i += 1
    return i
