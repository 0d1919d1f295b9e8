"""Runs one infer job on the loaded model and tells its story as events."""
from __future__ import annotations

import logging
import os
import time

import redis
from pydantic import ValidationError

from queue_schema import log_context, stats
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.events import now_ms
from queue_schema.operations import InferOperation
from worker import chat_template, narration, token_loop
from worker.publisher import JobEmitter
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)
LOG_PROMPTS = os.environ.get("INFERQ_LOG_PROMPTS") == "1"


class JobFailed(InferqError):
    """Raised after the job's ``error`` event is logged, so RQ files the job as failed."""


def prompt_text(runtime: WorkerRuntime, op: InferOperation) -> str:
    if op.prompt is not None:
        return op.prompt
    template = runtime.info.chat_template if runtime.info else None
    return chat_template.render([m.model_dump() for m in op.messages], template)


def run_job(runtime: WorkerRuntime, job_id: str, payload: dict, meta: dict) -> dict:
    """Run one job; whatever happens, its stream ends with ``end`` or ``error``."""
    emitter = JobEmitter(job_id, runtime.publisher, runtime.eventlog.next_seq(job_id))
    runtime.cancel.watch(job_id)
    token = log_context.job_id.set(job_id)
    started = time.monotonic()
    outcome, result = "failed", {}
    try:
        try:
            op = InferOperation.model_validate(payload)
        except ValidationError as exc:
            emitter.emit("started", model=runtime.spec.name, worker=runtime.id, queue_wait_ms=0)
            _fail(runtime, emitter, ErrorCode.INVALID_REQUEST,
                  f"the job's payload is not a valid infer operation ({exc.error_count()} errors)")
        result = _run(runtime, emitter, op, meta)
        outcome = "cancelled" if result["stop_reason"] == "cancelled" else "finished"
        return result
    except JobFailed:
        raise
    except Exception as exc:  # a bug: still close the stream so no client waits forever
        log.exception("job %s: unexpected failure on worker %s", job_id, runtime.id)
        emitter.emit("error", code=ErrorCode.INFERENCE_FAILED.value, retriable=True,
                     message=f"internal error in the worker: {exc.__class__.__name__}")
        raise
    finally:
        runtime.cancel.clear()
        runtime.publisher.flush()
        _record(runtime, meta, outcome, result, time.monotonic() - started)
        log_context.job_id.reset(token)


def _record(runtime: WorkerRuntime, meta: dict, outcome: str, result: dict, seconds: float) -> None:
    ttft = result.get("first_token_ms")
    wait = result.get("queue_wait_ms")
    try:
        stats.record_job(runtime.redis, runtime.spec.name, outcome, result.get("tokens_out", 0),
                         None if ttft is None else ttft / 1000, None if wait is None else wait / 1000,
                         seconds if outcome == "finished" else None)
    except redis.RedisError as exc:  # metrics are not worth failing a job over
        log.warning("worker %s: could not record job stats: %s", runtime.id, exc)


def _fail(runtime: WorkerRuntime, emitter: JobEmitter, code: ErrorCode, message: str, retriable: bool = False):
    runtime.narrate(narration.job_failed(runtime.id, emitter.job_id, code.value, message), emitter)
    emitter.emit("error", code=code.value, message=message, retriable=retriable)
    raise JobFailed(code, message, retriable=retriable)


def _run(runtime: WorkerRuntime, emitter: JobEmitter, op: InferOperation, meta: dict) -> dict:
    backend = runtime.backend
    job_id = emitter.job_id
    wait_ms = max(0, now_ms() - int(meta.get("submitted_ms") or now_ms()))
    emitter.emit("started", model=runtime.spec.name, worker=runtime.id, queue_wait_ms=wait_ms)
    if op.ttl_s is not None and wait_ms > op.ttl_s * 1000:
        _fail(runtime, emitter, ErrorCode.TIMEOUT,
              f"the job waited {wait_ms / 1000:.1f} s in the queue, longer than its ttl_s={op.ttl_s}", retriable=True)
    if runtime.cancel.is_cancelled():
        emitter.emit("end", tokens_out=0, decode_time_ms=0, stop_reason="cancelled", text="")
        return {"text": "", "tokens_out": 0, "stop_reason": "cancelled", "queue_wait_ms": wait_ms}
    try:
        text = prompt_text(runtime, op)
        prompt = backend.tokenize(text)
    except Exception as exc:  # a template error, or a tokenizer failure
        _fail(runtime, emitter, ErrorCode.INVALID_REQUEST, f"cannot build the prompt: {exc}")
    if LOG_PROMPTS:  # opt-in only: prompts are user data
        log.info("prompt: %r", text)
    runtime.narrate(narration.job_started(runtime.id, job_id, runtime.spec.name, wait_ms, len(prompt)), emitter)
    if len(prompt) + op.max_tokens > backend.context_length:
        _fail(runtime, emitter, ErrorCode.CONTEXT_LENGTH_EXCEEDED,
              f"prompt is {len(prompt)} tokens and max_tokens is {op.max_tokens}: "
              f"{len(prompt) + op.max_tokens} is over the model's context of {backend.context_length} tokens")
    deadline = time.monotonic() + op.timeout_s
    try:
        gen = token_loop.generate(backend, prompt, op, lambda t, i: emitter.emit("token", t=t, i=i),
                                  runtime.cancel.is_cancelled, deadline)
    except MemoryError as exc:
        runtime.check_health()
        _fail(runtime, emitter, ErrorCode.VRAM_OOM, f"out of memory while decoding: {exc}", retriable=True)
    except Exception as exc:
        log.exception("job %s: backend failed on worker %s", job_id, runtime.id)
        runtime.check_health()
        _fail(runtime, emitter, ErrorCode.INFERENCE_FAILED, f"the backend failed: {exc}", retriable=True)
    if gen.stop_reason == "timeout":
        _fail(runtime, emitter, ErrorCode.TIMEOUT,
              f"decoding ran past timeout_s={op.timeout_s} after {gen.tokens_out} tokens", retriable=False)
    runtime.last_tokens_per_sec = gen.tokens_per_sec
    emitter.emit("metrics", tokens_per_sec=round(gen.tokens_per_sec, 2), vram_bytes=backend.vram_bytes(),
                 prompt_tokens=len(prompt), tokens_out=gen.tokens_out)
    runtime.narrate(narration.job_finished(runtime.id, job_id, gen.tokens_out, gen.decode_time_ms / 1000,
                                           gen.tokens_per_sec, gen.stop_reason), emitter)
    emitter.emit("end", tokens_out=gen.tokens_out, decode_time_ms=gen.decode_time_ms,
                 stop_reason=gen.stop_reason, text=gen.text)
    log.info("job %s on %s: %d tokens, %.1f tok/s, %s", job_id, runtime.id, gen.tokens_out,
             gen.tokens_per_sec, gen.stop_reason)
    return {"text": gen.text, "tokens_out": gen.tokens_out, "stop_reason": gen.stop_reason,
            "prompt_tokens": len(prompt), "decode_time_ms": gen.decode_time_ms,
            "first_token_ms": gen.first_token_ms, "queue_wait_ms": wait_ms, "metadata": op.metadata}
