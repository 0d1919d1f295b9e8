"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/embeddings``.

Each request becomes ordinary jobs (``infer``, or ``embed``; one per choice
when ``n`` > 1), so priorities, queue bounds, cancellation, ``GET /v1/jobs``
and the dashboards all apply, and they belong to the caller's tenant. An
``Idempotency-Key`` answers a repeated request with the first one's jobs
(with ``n`` > 1, each choice has a key derived from it). The request bodies
are ``api/openai/requests.py``; unknown OpenAI fields are ignored (clients
send many); answers are built by ``api/openai/answers.py`` and errors take
OpenAI's shape (``api/openai/errors.py``).

A client that leaves cancels its jobs, streamed or waited for, unless it sent
an Idempotency-Key (it said it would come back).
"""
from __future__ import annotations

import json
import logging
import time

import redis
from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context

from api import auth, disconnect, limits, relay, shutdown, sse
from api.extensions import resources
from api.jobs import idempotency, request_cancel, submit
from api.openai import answers, errors
from api.openai.requests import ChatRequest, CompletionRequest, EmbeddingRequest, parse
from queue_schema import keys
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle import views
from queue_schema.lifecycle.admission import Admitted, Idempotency

log = logging.getLogger(__name__)
bp = Blueprint("openai", __name__)
errors.install(bp)
WAIT_POLL_S = 1.0  # how often a request that waits for its answer looks whether its client is still there


class ClientGone(InferqError):
    """The client of a request that waits for its answer closed its connection."""

    code_default = ErrorCode.CANCELLED


# --- jobs of a request ---------------------------------------------------------------------------
def queue_bound(ops: list, idem: Idempotency | None) -> list:
    """Jobs of a request without an Idempotency-Key are of use only to the connection that waits for them:
    if that API process dies, nobody holds their ids. They carry a queue-wait bound (``ttl_s``), so a
    worker that reaches them much later ends them with TIMEOUT instead of running them for nobody."""
    ttl = int(current_app.config["OPENAI_QUEUE_TTL_S"])
    if idem is not None or ttl <= 0:
        return ops
    return [op.model_copy(update={"ttl_s": ttl}) for op in ops]


def submit_all(ops, idem: Idempotency | None) -> list[Admitted]:
    """Admit every choice's job, choice i under the key's ``Idempotency.choice(i)``, or find the one
    that key already made. If one is refused, the jobs this request admitted are cancelled and their
    keys forgotten, so a retry with the key starts afresh, as it does when a single job is refused;
    choices found by their key (another request's) are left to that request."""
    admitted: list[Admitted] = []
    try:
        for i, op in enumerate(ops):
            admitted.append(submit(op, idem.choice(i) if idem else None))
    except Exception:
        fresh = [(i, a) for i, a in enumerate(admitted) if not a.replayed]
        if idem is not None:
            tenant = auth.principal().tenant
            for i, a in fresh:
                try:
                    resources().admission.forget(tenant, idem.choice(i), a.job_id)
                except redis.RedisError:
                    log.warning("job %s: could not forget its idempotency key", a.job_id)
        cancel_open([a.job_id for _, a in fresh])
        raise
    return admitted


def cancel_open(job_ids: list[str]) -> None:
    try:
        for job_id, view in zip(job_ids, views.views(resources().redis, job_ids, resources().eventlog.redis)):  # one round trip
            if view is not None and view.terminal is None:
                request_cancel(job_id, view.state)
    except redis.RedisError:
        log.warning("jobs %s: could not cancel them", ", ".join(job_ids))


def events(job_id: str, gone=None):
    """The job's events as dicts, from its log and then live, until the terminal one; ``gone`` (a
    ``disconnect.watcher``) is asked at least every ``WAIT_POLL_S``, and ClientGone raised once it says so."""
    keepalive = float(current_app.config["KEEPALIVE_S"])
    looked = time.monotonic()
    for frames in relay.job_batches(job_id, -1, keepalive, idle_s=WAIT_POLL_S if gone else None):
        if gone is not None and time.monotonic() - looked >= WAIT_POLL_S:
            looked = time.monotonic()
            if gone():
                raise ClientGone()
        for frame in frames:
            yield json.loads(frame.data)


def wait_for(job_id: str, gone) -> answers.JobResult:
    """A job's events folded into its result; OpenAI's error if it failed or its log was cut off."""
    result = answers.JobResult()
    for event in events(job_id, gone):
        if result.feed(event):
            result.raise_failure()
            return result
    raise errors.interrupted(job_id)


def abandoned(job_ids: list[str]):
    """Nobody waits for these jobs any more: free the workers. The answer goes nowhere (499, nginx's
    "client closed request", for the access log)."""
    log.info("jobs %s: their client left before the answer; cancelling them", ",".join(job_ids))
    cancel_open(job_ids)
    return Response(status=499)


# --- completions -----------------------------------------------------------------------------------
def respond(req, chat: bool):
    # An Idempotency-Key answers again with the first request's jobs: streamed again, or their result.
    idem = idempotency(request.path, req.model_dump_json())
    ops = queue_bound(req.operations(), idem)
    # Streamed or waited for, the answer holds a connection until the jobs end: a slot, taken before any
    # job exists (a 429 runs nothing).
    release = limits.stream_slot()
    try:
        job_ids = [a.job_id for a in submit_all(ops, idem)]
        # The first job's submit time, so a replayed answer is the same answer.
        submitted = resources().redis.hget(keys.job_info(job_ids[0]), "submitted")
    except Exception:
        release()
        raise
    answer = answers.Completions(chat, job_ids[0], ops[0].model, ops[0].logprobs is not None,
                                 int(submitted) // 1000 if submitted else None, tool_names(ops[0]))
    headers = {"X-Inferq-Job-Id": ",".join(job_ids)}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # With a key, the client means to come back for the jobs: leaving does not cancel them.
        stream = _stream(job_ids, answer, include_usage, cancel_on_disconnect=idem is None)
        response = Response(stream_with_context(stream), mimetype="text/event-stream",
                            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response.call_on_close(release)
        return response
    try:
        return _wait(job_ids, answer, headers, gone=None if idem else disconnect.watcher())
    finally:
        release()


def tool_names(op) -> tuple[str, ...]:
    return tuple(t.function.name for t in op.tools) if getattr(op, "tools", None) else ()


def _wait(job_ids: list[str], answer: answers.Completions, headers: dict, gone):
    """The whole answer, once every choice's job ended; a client that leaves first has its jobs cancelled
    (``gone`` is None when the client said it would come back: an Idempotency-Key)."""
    results = []
    try:
        for index, job_id in enumerate(job_ids):
            try:
                results.append(wait_for(job_id, gone))
            except errors.OpenAIError:
                cancel_open(job_ids[index + 1:])  # one choice failed: the others are of no use
                raise
    except ClientGone:
        return abandoned(job_ids)
    return jsonify(answer.whole(results)), 200, headers


def data(obj) -> str:
    """One SSE data message, escaped as the job stream is: U+2028 and kin stay inside the line."""
    return sse.frame(json.dumps(obj, ensure_ascii=False))


def _stream(job_ids: list[str], answer: answers.Completions, include_usage: bool, cancel_on_disconnect: bool = True):
    """OpenAI's chunks for the jobs' events; ``[DONE]`` only after every choice is complete.

    A job error, or a stream cut off before the jobs ended, ends with an error
    chunk in OpenAI's shape and no ``[DONE]``: the SDKs raise on it, so an
    interrupted answer never passes for a whole one. With ``n`` > 1 the
    choices' chunks interleave as their tokens come, each with its ``index``.
    Chunks made from events that arrived together go out in one write.
    """
    done = False
    results = [answers.JobResult() for _ in job_ids]
    readers: list = [None] * len(job_ids)  # a choice's call reader, once its job says it was offered tools
    sent = [False] * len(job_ids)  # a choice's reader sent something (content held back is not sent)
    offsets = [0] * len(job_ids)  # completions' text_offset, per choice
    keepalive = float(current_app.config["KEEPALIVE_S"])
    try:
        first = [answer.first_chunk(i) for i in range(len(job_ids))]
        if any(first):
            yield "".join(data(c) for c in first if c)
        try:
            for batch in relay.merged_batches(job_ids, keepalive):
                if not batch:
                    yield sse.KEEPALIVE
                out = []
                for index, frame in batch:
                    event = json.loads(frame.data) if frame.type in ("started", "token", "metrics", "end", "error") \
                        else None
                    if event is None:
                        continue
                    results[index].feed(event)
                    reader = readers[index]
                    if frame.type == "started" and results[index].restarted and (offsets[index] or sent[index]):
                        # A take that was lost sent part of this answer: it cannot be taken back.
                        done = True
                        out.append(data(errors.answer(errors.restarted(job_ids[index]))[1]))
                        cancel_open(job_ids)
                        break
                    if frame.type == "started":
                        readers[index] = answer.tool_stream(results[index])
                    elif frame.type == "token" and reader is not None:
                        chunks = answer.tool_chunks(index, reader.feed(event["t"]))
                        sent[index] = sent[index] or bool(chunks)
                        out += [data(c) for c in chunks]
                    elif frame.type == "token":
                        tokens = [event] if "logprob" in event else None
                        if event["t"] or tokens:
                            out.append(data(answer.chunk(index, event["t"], None, tokens, offsets[index])))
                        offsets[index] += len(event["t"])
                    elif frame.type == "error":
                        done = True
                        out.append(data(errors.answer(errors.job_failed(event))[1]))
                        break
                    elif frame.type == "end":
                        finish = results[index].finish_reason
                        if reader is not None:
                            out += [data(c) for c in answer.tool_chunks(index, reader.close())]
                            finish = "tool_calls" if reader.result.calls else finish
                        out.append(data(answer.chunk(index, None, finish)))
                        if all(r.end is not None for r in results):
                            done = True
                            if include_usage:
                                out.append(data(answer.usage_chunk(
                                    results[0].prompt_tokens, sum(r.completion_tokens for r in results))))
                            out.append("data: [DONE]\n\n")
                if out:
                    yield "".join(out)
                if done:
                    break
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("jobs %s: their OpenAI stream lost Redis: %s", ",".join(job_ids), exc)
        if not done:
            done = True  # said so to the client: the jobs go on, nobody cancels them
            yield data(errors.answer(errors.interrupted(job_ids[0]))[1])
        elif not all(r.end is not None for r in results):  # one choice failed: the others are of no use
            cancel_open(job_ids)
    finally:
        if not done and cancel_on_disconnect and not shutdown.stopping.is_set():
            cancel_open(job_ids)  # the client went away mid-stream: free the workers


@bp.post("/v1/completions")
def completions():
    return respond(parse(CompletionRequest, request.get_data()), chat=False)


@bp.post("/v1/chat/completions")
def chat_completions():
    return respond(parse(ChatRequest, request.get_data()), chat=True)


# --- embeddings ------------------------------------------------------------------------------------
@bp.post("/v1/embeddings")
def embeddings():
    """An ``embed`` job; the vectors come back as floats or (``encoding_format=base64``) as the worker
    sent them: little-endian float32, base64. An Idempotency-Key answers again with the first job's."""
    req = parse(EmbeddingRequest, request.get_data())
    idem = idempotency(request.path, req.model_dump_json())
    op, = queue_bound([req.operation()], idem)
    release = limits.stream_slot()
    try:
        job_id = submit(op, idem).job_id
        gone = None if idem else disconnect.watcher()
        vectors: dict[int, str] = {}
        result = answers.JobResult()
        try:
            for event in events(job_id, gone):
                if event["type"] == "embedding":
                    vectors[event["index"]] = event["embedding"]
                if result.feed(event):
                    break
            else:
                raise errors.interrupted(job_id)
        except ClientGone:
            return abandoned([job_id])
        result.raise_failure()
        if result.end["stop_reason"] == "cancelled":
            raise errors.cancelled()
        body = answers.embeddings(vectors, req.encoding_format, op.model, result.prompt_tokens)
        return jsonify(body), 200, {"X-Inferq-Job-Id": job_id}
    finally:
        release()
