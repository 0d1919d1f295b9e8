"""The event log: each job's events in a Redis Stream, relayed live on pub/sub.

``append`` writes events to their jobs' streams *and* publishes them on the
jobs' channels in one round trip: one Lua call for any number of jobs, so a
worker decoding eight sequences writes a decode step's events with one
command, and a rejected write is never published.

Every write is fenced. A job being run has a lease naming its one owner
(``queue_schema.lifecycle.leases``); the script compares the writer with the owner in
the same call and refuses the write if they differ, so a worker that lost its
job (it froze, or was cut off from Redis while another process took the job
over) can never interleave events with the new owner's. A job without a lease
(queued, or released) can be written by the unowned writer ``""`` only: the
API, logging a cancel.

The stream entry id is ``<seq>-1``, so a replay from a given seq is a plain
XRANGE and Redis itself keeps seqs unique. An event whose seq is already in
the log is skipped as a duplicate (a batch retried after a lost reply); a
seq that would leave a gap is refused. Terminal events carry a ``closed``
field; the script refuses any write after one and, with it, releases the
job's lease and takes it off the open-jobs index, so a job's stream ends with
exactly one ``end`` or ``error``.

The terminal write is also the one place every ending passes through (a
worker's, the reaper's, a cancel's), so the same step settles what hangs on
a job's end: it leaves its tenant's queued and running sets
(queue_schema.lifecycle.tenants) and is counted by tenant; a job with a webhook gets
its delivery scheduled (api.webhooks); a batch line is handed to
its batch (api.batch_store). No path that ends a job can miss them.

The published message is ``"<seq> <type> <json>"`` (``-`` for no seq): the
API's relay learns an event's seq and type without parsing its JSON, and the
SSE wire format stays the API's business (api/sse.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import redis

from queue_schema import keys
from queue_schema.events import Narration, _Event, parse_event
from queue_schema.lifecycle import clock
from queue_schema.settings import DEFAULTS

NARRATION_LOG_MAXLEN = 10_000
# A webhook delivery's record expires this long after the terminal write made it, sent or not: with no API
# process able to sign it, nothing else would end it (api/webhooks.py delivers within GIVE_UP_S, 24 h).
WEBHOOK_RECORD_TTL_S = 48 * 3600
UNOWNED = ""  # the writer that may write jobs nobody holds a lease on


class Appended(IntEnum):
    """What happened to one job's events in an append."""

    OK = 1
    CLOSED = 0  # the log already ended: nothing written
    FENCED = -1  # the writer does not hold the job's lease: nothing written
    GAP = -2  # the first new seq is past the log's end: nothing written


# KEYS: leases index, open-jobs index, tenant counters, webhooks due, batches due, batches claimed,
#       then (stream, channel, lease) per job.
# ARGV: writer, ttl, now (ms), the affixes of job info, queued and running sets, a batch's ended list
#       and a webhook delivery, a delivery record's ttl (s), then per job: its id, n, then (seq, event json,
#       published message, final state or "") n times.
_APPEND = """
local writer, ttl, now = ARGV[1], ARGV[2], ARGV[3]
local function ended(job, state)
  local info = ARGV[4] .. job .. ARGV[5]
  local meta = redis.call('HMGET', info, 'tenant', 'limit', 'webhook', 'batch')
  if meta[2] then
    redis.call('SREM', ARGV[6] .. meta[2] .. ARGV[7], job)
    redis.call('SREM', ARGV[8] .. meta[2] .. ARGV[9], job)
  end
  if meta[1] then redis.call('HINCRBY', KEYS[3], state .. '|' .. meta[1], 1) end
  if meta[3] then
    local delivery = 'job_' .. job
    local record = ARGV[12] .. delivery .. ARGV[13]
    redis.call('HSET', record, 'url', meta[3], 'type', 'job.' .. state,
               'target', job, 'state', state, 'tenant', meta[1] or '', 'created', now)
    redis.call('EXPIRE', record, ARGV[14])
    redis.call('ZADD', KEYS[4], now, delivery)
  end
  if meta[4] then
    redis.call('RPUSH', ARGV[10] .. meta[4] .. ARGV[11], job)
    if not redis.call('ZSCORE', KEYS[6], meta[4]) then redis.call('ZADD', KEYS[5], now, meta[4]) end
  end
  if meta[1] then redis.call('EXPIRE', info, ttl) end
end
local out = {}
local a = 15
for k = 7, #KEYS, 3 do
  local stream, channel, lease = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local job, n = ARGV[a], tonumber(ARGV[a + 1])
  local first = a + 2
  a = a + 2 + 4 * n
  local owner = redis.call('HGET', lease, 'owner') or ''
  local status = 1
  local next_seq = 0
  if owner ~= writer then
    status = -1
  else
    local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
    if last then
      if #last[2] > 2 then status = 0 end
      next_seq = tonumber(string.match(last[1], '^(%d+)')) + 1
    end
  end
  if status == 1 then
    for i = first, first + 4 * (n - 1), 4 do
      local seq = tonumber(ARGV[i])
      if seq > next_seq then status = -2 break end
      if seq == next_seq then
        if ARGV[i + 3] ~= '' then
          redis.call('XADD', stream, seq .. '-1', 'e', ARGV[i + 1], 'closed', '1')
          redis.call('PUBLISH', channel, ARGV[i + 2])
          redis.call('DEL', lease)
          redis.call('ZREM', KEYS[1], job)
          redis.call('ZREM', KEYS[2], job)
          ended(job, ARGV[i + 3])
          next_seq = seq + 1
          break
        end
        redis.call('XADD', stream, seq .. '-1', 'e', ARGV[i + 1])
        redis.call('PUBLISH', channel, ARGV[i + 2])
        next_seq = seq + 1
      end
    end
    redis.call('EXPIRE', stream, ttl)
  end
  out[#out + 1] = status
end
return out
"""
_NARRATE = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""


_ENDING_AFFIXES = [*keys.split(keys.job_info), *keys.split(keys.limit_queued), *keys.split(keys.limit_running),
                   *keys.split(keys.batch_ended), *keys.split(keys.webhook)]


def final_state(event: _Event) -> str | None:
    """What a terminal event makes of its job (finished, failed, cancelled); None for others."""
    if not event.terminal:
        return None
    if event.type == "end":
        return "cancelled" if event.stop_reason == "cancelled" else "finished"
    return "cancelled" if event.code == "CANCELLED" else "failed"


def _entry_id(seq: int) -> str:
    return f"{seq}-1"


def published(event_json: str, event_type: str, seq: int | None) -> str:
    """What is published on a job's (or the narration) channel for one event."""
    return f"{'-' if seq is None else seq} {event_type} {event_json}"


class EventLog:
    """Append and replay job events. Safe to share between threads."""

    def __init__(self, client: redis.Redis, ttl_s: int = DEFAULTS.job_ttl_s):
        """``ttl_s``: how long a job's log lives after its last write (the process's Settings.job_ttl_s)."""
        self.redis = client
        self.ttl_s = ttl_s
        self._append = client.register_script(_APPEND)
        self._narrate = client.register_script(_NARRATE)

    def append(self, event: _Event, writer: str = UNOWNED) -> Appended:
        """Write one job event (or narration) as ``writer``."""
        if event.job_id is None:
            self.append_many([event], writer)
            return Appended.OK
        return self.append_many([event], writer)[event.job_id]

    def append_many(self, events: Sequence[_Event], writer: str = UNOWNED) -> dict[str, Appended]:
        """Write events in order, in one round trip; what happened, per job.

        Each job's events must have consecutive seqs. Narration is also added
        to the operators' feed (one more script call in the same pipeline).
        """
        per_job: dict[str, list] = {}
        narration = []
        for event in events:
            data = event.model_dump_json(exclude_none=True)
            if event.job_id is not None:
                per_job.setdefault(event.job_id, []).extend(
                    (event.seq, data, published(data, event.type, event.seq), final_state(event) or ""))
            if isinstance(event, Narration):
                narration.append(data)
        keys_ = [keys.LEASES, keys.OPEN_JOBS, keys.TENANT_COUNTERS, keys.WEBHOOKS_DUE, keys.BATCHES_DUE,
                 keys.BATCHES_CLAIMED]
        args = [writer, self.ttl_s, clock.now_ms(self.redis), *_ENDING_AFFIXES, WEBHOOK_RECORD_TTL_S]
        for job_id, fields in per_job.items():
            keys_ += [keys.job_events(job_id), keys.job_channel(job_id), keys.job_lease(job_id)]
            args += [job_id, len(fields) // 4, *fields]
        if not narration:
            statuses = self._append(keys=keys_, args=args) if per_job else []
        else:
            pipe = self.redis.pipeline(transaction=False)
            if per_job:
                self._append(keys=keys_, args=args, client=pipe)
            for data in narration:
                self._narrate(keys=[keys.NARRATION_LOG, keys.NARRATION_CHANNEL],
                              args=[data, published(data, "narration", None), NARRATION_LOG_MAXLEN], client=pipe)
            results = pipe.execute()
            statuses = results[0] if per_job else []
        return {job_id: Appended(int(s)) for job_id, s in zip(per_job, statuses)}

    def replay(self, job_id: str, after_seq: int = -1, until_seq: int | None = None,
               count: int | None = None) -> list[_Event]:
        """Events with ``after_seq < seq`` (and ``seq <= until_seq`` if given), in order; at most ``count``."""
        end = "+" if until_seq is None else _entry_id(until_seq)
        entries = self.redis.xrange(keys.job_events(job_id), f"{after_seq + 1}-0", end, count=count)
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
