"""The event log: each job's events in a Redis Stream, relayed live on pub/sub.

``append_many`` writes events to their jobs' streams *and* publishes them on
the jobs' channels in one round trip: one script call for any number of jobs
(``lua/append.lua``), so a worker decoding eight sequences writes a decode
step's events with one command, and a rejected write is never published. The
log's conventions (entry ids, the closed mark, the live message) are written
once, in ``lua/lib/log.lua``, and every script that reads or writes a log uses
them: this one, admission's ``queued`` event, the lease script's look at a
log's end, the tenants' tidy.

Every write is fenced. A job being run has a lease naming its one owner
(``queue_schema.lifecycle.leases``); the script compares the writer with the
owner in the same call and refuses the write if they differ, so a worker that
lost its job (it froze, or was cut off from Redis while another process took
the job over) can never interleave events with the new owner's. A job without
a lease (queued) can be written by the unowned writer ``""`` only: the API,
logging a cancel.

The stream entry id is ``<seq>-1``, so a replay from a given seq is a plain
XRANGE and Redis itself keeps seqs unique. An event whose seq is already in
the log is skipped as a duplicate (a batch retried after a lost reply); a
seq that would leave a gap is refused. A terminal event closes the log (the
script refuses any write after it), so a job's stream ends with exactly one
``end`` or ``error``, and puts the job on the settling set: what hangs on a
job's end (its lease, its tenant's counts, a webhook, a batch, RQ's books) is
settled next, once, by ``queue_schema.lifecycle.ending``.

The published message is ``"<seq> <type> <json>"`` (``-`` for no seq): the
API's relay learns an event's seq and type without parsing its JSON, and the
SSE wire format stays the API's business (api/sse.py).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from enum import IntEnum

import redis

from queue_schema import keys
from queue_schema.events import Narration, _Event, parse_event
from queue_schema.lifecycle import clock, scripts
from queue_schema.settings import DEFAULTS

NARRATION_LOG_MAXLEN = 10_000
REFRESH_MEMORY = 10_000  # jobs whose last TTL renewal a process remembers
UNOWNED = ""  # the writer that may write jobs nobody holds a lease on
_APPEND, _NARRATE = scripts.load("append"), scripts.load("narrate")


class Appended(IntEnum):
    """What happened to one job's events in an append."""

    OK = 1
    CLOSED = 0  # the log already ended: nothing written
    FENCED = -1  # the writer does not hold the job's lease: nothing written
    GAP = -2  # the first new seq is past the log's end: nothing written





def final_state(event: _Event) -> str | None:
    """What a terminal event makes of its job (finished, failed, cancelled); None for others."""
    if not event.terminal:
        return None
    if event.type == "end":
        return "cancelled" if event.stop_reason == "cancelled" else "finished"
    return "cancelled" if event.code == "CANCELLED" else "failed"


def _entry_id(seq: int) -> str:
    return f"{seq}-1"


class EventLog:
    """Append and replay job events. Safe to share between threads."""

    def __init__(self, client: redis.Redis, ttl_s: int = DEFAULTS.job_ttl_s):
        """``ttl_s``: how long a job's log lives after its last write (the process's Settings.job_ttl_s)."""
        self.redis = client
        self.ttl_s = ttl_s
        # When this process last renewed each job's log TTL (monotonic): a renewal at every decode step was an
        # EXPIRE per job per step. Renewed again after a quarter of the TTL, so a log never lapses mid-run.
        self._refreshed: dict[str, float] = {}
        self._refresh_s = max(1.0, ttl_s / 4)

    def append(self, event: _Event, writer: str = UNOWNED) -> Appended:
        """Write one job event (or narration) as ``writer``."""
        if event.job_id is None:
            self.append_many([event], writer)
            return Appended.OK
        return self.append_many([event], writer)[event.job_id]

    def append_many(self, events: Sequence[_Event], writer: str = UNOWNED) -> dict[str, Appended]:
        """Write events in order, in one round trip; what happened, per job (see ``append_runs``)."""
        return {job_id: status for (job_id, _), status in self.append_runs(events, writer).items()}

    def append_runs(self, events: Sequence[_Event], writer: str = UNOWNED) -> dict[tuple[str, str], Appended]:
        """Write events in order, in one round trip; what happened, per (job, writer).

        Each event is written as its own ``_writer`` when it has one (a worker's events name the take of the
        job they belong to), else as ``writer``. Each job's events must have consecutive seqs. Narration is
        also added to the operators' feed (one more script call in the same pipeline).
        """
        per_job: dict[tuple[str, str], list] = {}
        narration = []
        for event in events:
            data = event.model_dump_json(exclude_none=True)
            if event.job_id is not None:
                run = (event.job_id, event._writer or writer)
                per_job.setdefault(run, []).extend((event.seq, event.type, data, final_state(event) or ""))
            if isinstance(event, Narration):
                narration.append(data)
        more_keys, more_args = [], []
        renew = {job_id: self._renewal_due(job_id) for job_id, _ in per_job}
        for (job_id, by), fields in per_job.items():
            more_keys += [keys.job_events(job_id), keys.job_channel(job_id), keys.job_lease(job_id)]
            more_args += [job_id, by, len(fields) // 4, "1" if renew[job_id] else "0", *fields]
        args = {"ttl": self.ttl_s, "now": clock.now_ms(self.redis)}
        if not narration:
            statuses = _APPEND(self.redis, {"settling": keys.SETTLING}, args, more_keys, more_args) if per_job else []
        else:
            pipe = self.redis.pipeline(transaction=False)
            if per_job:
                _APPEND(pipe, {"settling": keys.SETTLING}, args, more_keys, more_args)
            for data in narration:
                _NARRATE(pipe, {"log": keys.NARRATION_LOG, "channel": keys.NARRATION_CHANNEL},
                         {"event": data, "maxlen": NARRATION_LOG_MAXLEN})
            results = pipe.execute()
            statuses = results[0] if per_job else []
        done = {run: Appended(int(s)) for run, s in zip(per_job, statuses)}
        self._renewed([job_id for (job_id, _), status in done.items() if renew[job_id] and status == Appended.OK])
        return done

    def _renewal_due(self, job_id: str) -> bool:
        """Whether this write should renew the log's TTL (the script also renews it at a terminal event)."""
        last = self._refreshed.get(job_id)
        return last is None or time.monotonic() - last >= self._refresh_s

    def _renewed(self, job_ids: list[str]) -> None:
        # Noted only once the write is in: a write that failed (and is retried) still renews.
        if len(self._refreshed) + len(job_ids) > REFRESH_MEMORY:  # jobs long gone: forget them
            self._refreshed.clear()
        now = time.monotonic()
        for job_id in job_ids:
            self._refreshed[job_id] = now

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
