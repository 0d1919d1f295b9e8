"""Stored Responses API responses: a small Redis hash per response (``keys.response``), and their jobs' logs.

A response is one ``infer`` job; its id is ``resp_<job id>``. The hash holds
what the log does not: the tenant it belongs to, the job, ``created_at``, the
model, the request's settings the response echoes (instructions, metadata,
tools, text...) and its input items, every item the model was given: the
previous responses' inputs and outputs when it continued a conversation
(``previous_response_id``), then the request's own input. The output is never
stored here: it is the job's log, folded by ``api/openai/response_events.py``
whenever asked, so a response read, streamed or continued says what the log
says. A conversation is copied forward into each response that continues
it, so a response never needs the ones before it once it exists.

How long: a hash lives ``2 x INFERQ_JOB_TTL_S`` plus its job's decoding
deadline from its creation (the job's log may outlive its queue wait by a
TTL), and whoever reads it after its job ended pins it to a job TTL after that
end: as long as its log lives. A hash whose log is gone answers as unknown.
``store: false`` responses get no hash at all: nothing can read them back,
nor continue them.

Refused: an id that is not a stored response, one whose log expired, and
another tenant's, all alike (404, as for jobs).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import redis

from api import auth
from api.openai import errors
from api.openai.response_events import Meta
from queue_schema import keys
from queue_schema.errors import ErrorCode
from queue_schema.lifecycle.eventlog import EventLog

ID = re.compile(r"^resp_([0-9a-f]{32})$")
LOG_PAGE = 256


@dataclass(frozen=True)
class Record:
    meta: Meta
    tenant: str
    input: list[dict]  # the input items, with their ids, in order

    @property
    def id(self) -> str:
        return self.meta.id

    @property
    def job_id(self) -> str:
        return self.meta.job_id


def not_found(response_id: str, param: str | None = None) -> errors.OpenAIError:
    code = "previous_response_not_found" if param == "previous_response_id" else "not_found"
    return errors.OpenAIError(ErrorCode.NOT_FOUND, f"no response with id {response_id!r} (unknown, not stored, or "
                              "expired)", 404, param, code)


def save(client: redis.Redis, record: Record, ttl_s: int) -> None:
    m = record.meta
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.response(m.id), mapping={
        "tenant": record.tenant, "job": m.job_id, "created_at": m.created_at, "model": m.model,
        "settings": json.dumps(m.settings, ensure_ascii=False), "input": json.dumps(record.input, ensure_ascii=False)})
    pipe.expire(keys.response(m.id), ttl_s)
    pipe.execute()


def find(client: redis.Redis, eventlog: EventLog, response_id: str, param: str | None = None) -> Record:
    """The stored response the current request may see, or OpenAI's 404 (naming ``param``)."""
    match = ID.match(response_id or "")
    raw = client.hgetall(keys.response(response_id)) if match else {}
    if not raw or not auth.can_see(raw.get(b"tenant", b"").decode()) or not eventlog.exists(match.group(1)):
        raise not_found(response_id, param)
    meta = Meta(raw[b"job"].decode(), int(raw[b"created_at"]), raw[b"model"].decode(), json.loads(raw[b"settings"]))
    return Record(meta, raw[b"tenant"].decode(), json.loads(raw[b"input"]))


def delete(client: redis.Redis, response_id: str) -> None:
    client.delete(keys.response(response_id))


def log_events(eventlog: EventLog, job_id: str) -> list[dict]:
    """The job's whole log as dicts (what the relay would send), read a page at a time."""
    out: list[dict] = []
    after = -1
    while True:
        page = eventlog.replay(job_id, after_seq=after, count=LOG_PAGE)
        out += [e.model_dump(mode="json", exclude_none=True) for e in page]
        if len(page) < LOG_PAGE:
            return out
        after = page[-1].seq


def pin(client: redis.Redis, response_id: str, end: dict | None, job_ttl_s: int) -> None:
    """Its job ended (``end``: the terminal event): the hash lives as long as the job's log, a TTL after."""
    if end is not None and end.get("ts"):
        client.pexpireat(keys.response(response_id), int(end["ts"]) + job_ttl_s * 1000)
