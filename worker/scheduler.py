"""The scheduler: every running job's next token in one decode call per step (continuous batching).

This is inferq's one token loop, for every backend. It knows nothing of
events, Redis or jobs' books: a step takes what the inbox brought
(``worker.inbox``: jobs to run, cancels, drops, stop-all), decodes, and
returns what happened as a value, a ``StepOutput``; the job layer
(``worker.jobs``) turns it into events. Each step:

1. applies the inbox, and admits waiting jobs into free slots, where the
   prefix cache (``worker.prefix_cache``) finds the longest prefix of the new
   prompt a slot already holds;
2. ends sequences that were cancelled, ran past their deadline, or whose
   lease this worker lost;
3. builds one decode: the next token of every decoding sequence first, then
   chunks of prompts up to a token budget sized so a step takes about
   ``STEP_TARGET_S`` (a long prompt is prefilled over several steps while
   the others keep streaming, and a cancel during a prefill lands within a
   step);
4. samples each sequence's next token (in the backend, in C), turns token
   bytes into safe text (``TextAssembler``: whole UTF-8 characters, stop
   strings held back) and adds log-probabilities for the sequences that asked.

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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from queue_schema.errors import ErrorCode, InferqError
from worker import logprobs
from worker.backends.base import Backend, Chunk, NoTokenAllowed, SamplingParams, TokenSampler
from worker.inbox import Cancel, Drop, FinishReason, Inbox, StopAll, Submit
from worker.prefix_cache import PrefixCache
from worker.text_assembler import TextAssembler

log = logging.getLogger(__name__)
STEP_TARGET_S = 0.05
MIN_PREFILL_CHUNK = 16
GRAMMAR_LIMIT_S = 1.0
_EARLY_CANCELS = 10_000  # cancels for jobs not submitted yet, remembered (oldest forgotten first)


@dataclass(eq=False)
class Sequence:
    """One job's decoding: what the scheduler needs, and what it reports when the job ends."""

    job_id: str
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stops: Seq[str]
    deadline: float  # time.monotonic() past which the job ends with TIMEOUT
    context: object = None  # the job layer's own state, untouched here
    logprobs: int | None = None  # top alternatives on each token; None: no logprobs
    sampler: TokenSampler | None = None  # made by the job layer (it checks the grammar), else at admission
    # --- filled in while it runs ---
    cancelled: bool = False
    slot: int = -1
    reused: int = 0  # prompt tokens found in the cache
    at: int = 0  # next prompt token to evaluate
    pending: int | None = None  # sampled, not yet evaluated
    count: int = 0  # tokens generated
    assembler: TextAssembler = field(default_factory=TextAssembler)
    admitted_at: float = 0.0
    first_at: float | None = None
    last_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.at < len(self.prompt)


class Task:
    """Work for the engine thread that is not a token loop (an embed job), done a step at a time."""

    job_id: str
    deadline: float
    context: object = None
    cancelled: bool = False
    count: int = 0  # outputs so far (embeddings)
    started_at: float = 0.0

    def step(self, backend: Backend, budget: int) -> tuple[list, bool]:
        """Do the next piece (one decode call of about ``budget`` tokens): its outputs, and whether the
        whole job is done."""
        raise NotImplementedError


# --- what a step returns ---------------------------------------------------------------------
@dataclass(frozen=True)
class TokenOut:
    """Text that became safe to send (``text`` may be empty with logprobs: one output per token then)."""

    item: Sequence
    text: str
    index: int  # the generated token's index
    logprobs: dict | None = None  # its piece, logprob and alternatives (logprobs.fields), when asked


@dataclass(frozen=True)
class Finished:
    item: Sequence | Task
    reason: FinishReason
    text: str
    tokens_out: int  # tokens generated (a task: outputs made)
    decode_time_ms: int
    first_token_ms: int | None
    tokens_per_sec: float
    error: BaseException | None = None


@dataclass
class StepOutput:
    """Everything a step did, in order: a job's outputs come before its ``Finished``."""

    outputs: list = field(default_factory=list)
    decoded: int = 0  # sequences in the step's decode call


class GrammarTooSlow(InferqError):
    def __init__(self, seconds: float, limit_s: float):
        super().__init__(ErrorCode.INVALID_REQUEST, f"the grammar took {seconds:.3f} s to sample one token, more "
                         f"than the worker's {limit_s:g} s; simplify it (fewer alternatives that match the same text)")


class Scheduler:
    def __init__(self, backend: Backend, inbox: Inbox, on_failure: Callable[[int], object] = lambda slot: None,
                 grammar_limit_s: float = GRAMMAR_LIMIT_S):
        self.backend = backend
        self.inbox = inbox
        self._on_failure = on_failure  # the backend failed: probe it, once, in the free slot given
        self.cache = PrefixCache(backend, backend.slots)
        self.slots: list[Sequence | None] = [None] * backend.slots
        self._waiting: list[Sequence | Task] = []  # taken from the inbox, not admitted yet (engine thread)
        self._tasks: list[Task] = []  # running, oldest first (engine thread only)
        self._early_cancels: OrderedDict[str, None] = OrderedDict()
        self._prefill_s_per_token: float | None = None
        # A grammar can be costly to apply to every token of the vocabulary; one sample that takes longer
        # than this ends that job alone (the others in the step are sampled as usual).
        self.grammar_limit_s = grammar_limit_s
        self.decoding_since: float | None = None  # monotonic start of the decode call running now, if any
        self.steps = 0
        self.batch_sizes: list[int] = []  # sequences per decode call, last few hundred steps
        self.slot_freed = threading.Event()  # a job ended: intake may take another

    # --- read from other threads ---------------------------------------------------------
    def capacity(self) -> int:
        """Jobs it can take now (a running task counts as a job; a job posted and not yet taken too)."""
        busy = sum(1 for s in self.slots if s is not None) + len(self._tasks) + len(self._waiting)
        return len(self.slots) - busy - self.inbox.submitted()

    def running(self) -> list[str]:
        return [s.job_id for s in self.slots if s is not None] + [t.job_id for t in self._tasks]

    def busy(self) -> bool:
        return bool(self.inbox.submitted() or self._waiting or self._tasks or any(s is not None for s in self.slots))

    # --- the engine thread ---------------------------------------------------------------------
    def step(self) -> StepOutput | None:
        """One scheduling step; None if there was nothing to do."""
        out = StepOutput()
        self._apply(self.inbox.drain(), out)
        self._admit()
        active = [s for s in self.slots if s is not None]
        if not active and not self._tasks:
            if out.outputs:  # jobs stopped before they started
                self.slot_freed.set()
                return out
            return None
        self._end_stopped(active, out)
        if self._tasks:
            self._run_task(out)
        chunks, plan = self._plan()
        if chunks:
            started = time.perf_counter()
            self.decoding_since = time.monotonic()  # the watchdog's: a call stuck in C cannot be interrupted
            try:
                rows = self.backend.decode(chunks)
            except Exception as exc:  # noqa: BLE001 - the job layer decides what it means
                log.exception("decode failed for %d sequences", len(plan))
                for seq in plan:
                    self._end(seq, FinishReason.FAILED, out, exc)
                self._probe()
            else:
                self._learn(chunks, time.perf_counter() - started)
                out.decoded = len(chunks)
                self._sample(plan, chunks, rows, out)
            finally:
                self.decoding_since = None
        self.steps += 1
        if any(isinstance(o, Finished) for o in out.outputs):
            self.slot_freed.set()
        return out

    def _apply(self, messages: list, out: StepOutput) -> None:
        for message in messages:
            if isinstance(message, Submit):
                item = message.item
                if item.job_id in self._early_cancels:
                    del self._early_cancels[item.job_id]
                    item.cancelled = True
                self._waiting.append(item)
            elif isinstance(message, Cancel):
                # Every take of the job the engine holds (a lost one may linger until its Drop arrives).
                found = [i for i in self._items() if i.job_id == message.job_id]
                for item in found:
                    item.cancelled = True
                if not found:  # it is still being prepared: it ends as it arrives
                    self._early_cancels[message.job_id] = None
                    while len(self._early_cancels) > _EARLY_CANCELS:
                        self._early_cancels.popitem(last=False)
            elif isinstance(message, Drop):
                found = self._find(message.job_id, message.owner)
                if found is not None:
                    self._stop(found, FinishReason.DROPPED, out)
            elif isinstance(message, StopAll):
                for item in self._items():
                    self._stop(item, message.reason, out)

    def _items(self) -> list:
        return [*(s for s in self.slots if s is not None), *self._tasks, *self._waiting]

    def _find(self, job_id: str, owner: str | None = None) -> Sequence | Task | None:
        for item in self._items():
            if item.job_id == job_id and (owner is None or getattr(item.context, "owner", None) == owner):
                return item
        return None

    def _stop(self, item: Sequence | Task, reason: FinishReason, out: StepOutput) -> None:
        if item in self._waiting:  # never started: nothing decoded, nothing cached
            self._waiting.remove(item)
            out.outputs.append(Finished(item, reason, "", 0, 0, None, 0.0))
        elif isinstance(item, Task):
            self._end_task(item, reason, out)
        else:
            self._end(item, reason, out)

    def _admit(self) -> None:
        while self._waiting:
            free = [i for i, s in enumerate(self.slots) if s is None]
            if len(free) <= len(self._tasks):  # a task holds a job slot, not a cache slot
                return
            item = self._waiting.pop(0)
            if isinstance(item, Sequence):
                self._place(item, free)
            else:
                item.started_at = time.perf_counter()
                self._tasks.append(item)

    def _place(self, seq: Sequence, free: list[int]) -> None:
        slot, keep = self.cache.place(seq.prompt, free)
        seq.slot, seq.reused, seq.at = slot, keep, keep
        seq.admitted_at = time.perf_counter()
        seq.assembler = TextAssembler(seq.stops)
        if seq.sampler is None:
            seq.sampler = self.backend.sampler(seq.params, seq.prompt)
        self.slots[slot] = seq

    def _end_stopped(self, active: list[Sequence], out: StepOutput) -> None:
        now = time.monotonic()
        for item in [*active, *self._tasks]:
            if item.cancelled:
                self._stop(item, FinishReason.CANCELLED, out)
            elif now > item.deadline:
                self._stop(item, FinishReason.TIMEOUT, out)

    def _run_task(self, out: StepOutput) -> None:
        task = self._tasks[0]
        try:
            outputs, done = task.step(self.backend, self._prefill_budget())
        except Exception as exc:  # noqa: BLE001 - the job layer decides what it means
            log.exception("job %s: its task failed", task.job_id)
            self._end_task(task, FinishReason.FAILED, out, exc)
            self._probe()
            return
        out.outputs += outputs
        if done:
            self._end_task(task, FinishReason.DONE, out)
        elif len(self._tasks) > 1:  # round robin between tasks, one piece each per step
            self._tasks.append(self._tasks.pop(0))

    def _end_task(self, task: Task, reason: FinishReason, out: StepOutput, error: BaseException | None = None) -> None:
        if task not in self._tasks:
            return
        self._tasks.remove(task)
        elapsed = time.perf_counter() - task.started_at
        out.outputs.append(Finished(task, reason, "", task.count, int(elapsed * 1000), None,
                                    task.count / elapsed if elapsed > 0 else 0.0, error))

    def _plan(self) -> tuple[list[Chunk], list[Sequence]]:
        chunks, plan = [], []
        for seq in self.slots:
            if seq is not None and seq.pending is not None:
                chunks.append(Chunk(seq.slot, [seq.pending], self.cache.length(seq.slot), True))
                plan.append(seq)
        budget = min(self.backend.options.batch_size - len(chunks), self._prefill_budget())
        for seq in sorted((s for s in self.slots if s is not None and s.prefilling), key=lambda q: q.admitted_at):
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

    def _sample(self, plan: list[Sequence], chunks: list[Chunk], rows: list[int | None], out: StepOutput) -> None:
        backend = self.backend
        for seq, chunk, row in zip(plan, chunks, rows):
            self.cache.extend(seq.slot, chunk.tokens)
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
                self._end(seq, FinishReason.EOS if backend.eos_token_id < 0 else FinishReason.REJECTED, out, exc)
                continue
            now = time.perf_counter()
            if seq.params.grammar is not None and now - began > self.grammar_limit_s:
                self._end(seq, FinishReason.GRAMMAR_SLOW, out, GrammarTooSlow(now - began, self.grammar_limit_s))
                continue
            seq.first_at = seq.first_at or now
            seq.last_at = now
            if backend.is_eog(token):
                self._end(seq, FinishReason.EOS, out)
                continue
            text = seq.assembler.push(backend.token_bytes(token))
            if seq.logprobs is not None:  # one output per token, its text possibly empty
                out.outputs.append(TokenOut(seq, text, seq.count, logprobs.fields(backend, row, token, seq.logprobs)))
            elif text:
                out.outputs.append(TokenOut(seq, text, seq.count))
            seq.count += 1
            if seq.assembler.stopped:
                self._end(seq, FinishReason.STOP_SEQUENCE, out)
            elif seq.count >= seq.max_tokens or self.cache.length(seq.slot) + 1 >= backend.context_length:
                self._end(seq, FinishReason.MAX_TOKENS, out)  # the context is full: as far as it can go
            else:
                seq.pending = token

    def _end(self, seq: Sequence, reason: FinishReason, out: StepOutput, error: BaseException | None = None) -> None:
        if self.slots[seq.slot] is not seq:
            return
        if reason.ran or reason == FinishReason.TIMEOUT:
            tail = seq.assembler.finish()
            if tail:
                out.outputs.append(TokenOut(seq, tail, max(seq.count - 1, 0)))
        if reason == FinishReason.FAILED:
            self.cache.forget(seq.slot)  # what a failed decode left in the cache is unknown
        self.slots[seq.slot] = None
        self.cache.touch(seq.slot)
        seq.sampler.close()
        elapsed = time.perf_counter() - seq.admitted_at
        if seq.count > 1 and seq.last_at > seq.first_at:
            rate = (seq.count - 1) / (seq.last_at - seq.first_at)
        else:
            rate = seq.count / elapsed if elapsed > 0 else 0.0
        first = None if seq.first_at is None else int((seq.first_at - seq.admitted_at) * 1000)
        out.outputs.append(Finished(seq, reason, seq.assembler.text, seq.count, int(elapsed * 1000), first, rate,
                                    error))

    def _probe(self) -> None:
        """After a failed call, one health probe, in a slot no sequence holds: the probe empties it, and
        a slot with a running sequence or a cached prefix would be left with a cache it no longer has."""
        free = next((i for i, s in enumerate(self.slots) if s is None), None)
        if free is not None:
            self.cache.cached[free].clear()
            self._on_failure(free)
