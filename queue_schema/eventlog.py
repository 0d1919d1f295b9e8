"""The event log: each job's events in a Redis Stream, relayed live on pub/sub.

``append`` writes an event to the job's stream *and* publishes it on the job's
channel in one round trip (a Lua script, so a rejected write is never
published). The stream entry id is ``<seq>-1``: Redis refuses an id that is not
larger than the last one, so two writers can never give two events one seq,
and a replay from a given seq is a plain XRANGE. Terminal events carry a
``closed`` field and the script refuses any write after one, so a job's
stream ends with exactly one ``end`` or ``error`` even when the API (cancel)
and a worker race.

The published message is ``"<seq> <type> <json>"`` (``-`` for no seq): the
API's relay learns an event's seq and type without parsing its JSON, and the
SSE wire format stays the API's business (api/sse.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import redis

from queue_schema import keys
from queue_schema.events import Narration, _Event, parse_event

DEFAULT_TTL_S = 24 * 3600  # a finished job's log lives this long (replay, late watchers)
NARRATION_LOG_MAXLEN = 10_000

# ARGV: ttl, then (entry id, event json, flask-sse message, terminal flag) per event.
# One call writes a whole batch: the publisher's Python cost per event is
# what competes with decoding for the GIL.
_APPEND = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if last[1] and #last[1][2] > 2 then return 0 end
for i = 2, #ARGV, 4 do
  if ARGV[i + 3] == '1' then
    redis.call('XADD', KEYS[1], ARGV[i], 'e', ARGV[i + 1], 'closed', '1')
    redis.call('PUBLISH', KEYS[2], ARGV[i + 2])
    redis.call('EXPIRE', KEYS[1], ARGV[1])
    return 1
  end
  redis.call('XADD', KEYS[1], ARGV[i], 'e', ARGV[i + 1])
  redis.call('PUBLISH', KEYS[2], ARGV[i + 2])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
_NARRATE = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""


def _entry_id(seq: int) -> str:
    return f"{seq}-1"


def published(event_json: str, event_type: str, seq: int | None) -> str:
    """What is published on a job's (or the narration) channel for one event."""
    return f"{'-' if seq is None else seq} {event_type} {event_json}"


class EventLog:
    """Append and replay job events. Safe to share between threads."""

    def __init__(self, client: redis.Redis, ttl_s: int = DEFAULT_TTL_S):
        self.redis = client
        self.ttl_s = ttl_s
        self._append = client.register_script(_APPEND)
        self._narrate = client.register_script(_NARRATE)

    def append(self, event: _Event) -> bool:
        """Write one event; False if the job's stream was already closed."""
        return self.append_many([event])

    def append_many(self, events: Sequence[_Event], pipe: redis.client.Pipeline | None = None) -> bool:
        """Write events in order in one round trip: one script call per job's run of events.

        With ``pipe`` the commands are only queued, for the caller to execute.
        Raises ``redis.ResponseError`` if a seq is already taken; returns False if
        the stream was closed by a terminal event before some of these.
        """
        own = pipe is None
        pipe = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        run_job, run_args = None, []
        for event in events:
            data = event.model_dump_json(exclude_none=True)
            if event.job_id is not None:
                if event.job_id != run_job and run_args:
                    self._flush_run(pipe, run_job, run_args)
                    run_args = []
                run_job = event.job_id
                run_args += [_entry_id(event.seq), data, published(data, event.type, event.seq),
                             "1" if event.terminal else "0"]
            if isinstance(event, Narration):
                self._narrate(keys=[keys.NARRATION_LOG, keys.NARRATION_CHANNEL],
                              args=[data, published(data, event.type, None), NARRATION_LOG_MAXLEN], client=pipe)
        if run_args:
            self._flush_run(pipe, run_job, run_args)
        if not own:
            return True
        results = pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return all(results)

    def _flush_run(self, pipe, job_id: str, args: list) -> None:
        self._append(keys=[keys.job_events(job_id), keys.job_channel(job_id)], args=[self.ttl_s, *args],
                     client=pipe)

    def replay(self, job_id: str, after_seq: int = -1, until_seq: int | None = None) -> list[_Event]:
        """Events with ``after_seq < seq`` (and ``seq <= until_seq`` if given), in order."""
        end = "+" if until_seq is None else _entry_id(until_seq)
        entries = self.redis.xrange(keys.job_events(job_id), f"{after_seq + 1}-0", end)
        return [parse_event(fields[b"e"]) for _, fields in entries]

    def last(self, job_id: str) -> _Event | None:
        entries = self.redis.xrevrange(keys.job_events(job_id), count=1)
        return parse_event(entries[0][1][b"e"]) if entries else None

    def next_seq(self, job_id: str) -> int:
        last = self.last(job_id)
        return 0 if last is None else last.seq + 1

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.job_events(job_id)))

    def recent_narration(self, count: int = 100) -> list[_Event]:
        if count <= 0:
            return []
        entries = self.redis.xrevrange(keys.NARRATION_LOG, count=count)
        return [parse_event(fields[b"e"]) for _, fields in reversed(entries)]
