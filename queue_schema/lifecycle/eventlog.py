"""The event log: each job's events in a Redis Stream, relayed live on pub/sub.

A job's log is a stream whose entry ids are ``<generation>-<seq>``: the
generation of the lease take that wrote the entry (``queue_schema.lifecycle.leases``:
it grows every time the job is taken), then the event's seq. Redis refuses an
XADD whose id is not above the stream's last, and every take first writes a
fence entry at its own generation (``lua/lib/log.lua``), so a worker that lost
its job (it froze, or was cut off while another process took the job over, or
its own intake took the job back) can never write into the new take's run: the
fence is the stream's order, and a write pays no read for it.

A decode step's events go through ``lua/step.lua``: per event one XADD and,
if Redis took it, one PUBLISH on the job's channel (a refused event never
reaches a live stream), for every job of the step in one call. It used to read
the lease and the log's end for every job at every step as well
(``bench.redis_cost`` counts it). The writers that need checks use
``lua/append.lua``: the unowned writer ``""`` (the API, logging a cancel of a
queued job; it takes a generation of its own, and so fences too) and every
batch with a terminal event, which closes the log at a generation of its own
and puts the job on the settling set in the same step. What hangs on a job's
end (its lease, its tenant's counts, a webhook, a batch, RQ's books) is settled
next, once, by ``queue_schema.lifecycle.ending``. A job's stream therefore ends
with exactly one ``end`` or ``error``.

Seqs grow by one along the log across takes, so a client's ``Last-Event-ID`` is
a seq, and a replay from it finds its place in the first generation holding a
later seq (``LOG.after``). An event already in the log is refused by its id and
counted as written (a batch retried after a lost reply).

**The log's own store.** With ``INFERQ_EVENTS_URL`` the logs and their channels
live on another Redis than the queue's, a Redis Cluster even (each job's keys
share a hash slot, ``{job id}``; the live message goes by sharded pub/sub, and
a call writes one job, since a script's keys must share a slot). The scripts of
the queue's Redis then only count a take's generation, and the take fences the
log after (``fence``); admission leaves the ``queued`` event in RQ's job hash,
written to the log next (``write_queued``); a terminal batch first puts its job
on the settling set of the queue's Redis, then closes the log, then settles
(``queue_schema.lifecycle.ending``). Unset, both are one Redis, and those steps
stay inside the queue's scripts.

The published message is ``"<seq> <type> <json>"``: the API's relay learns an
event's seq and type without parsing its JSON, and the SSE wire format stays
the API's business (api/sse.py).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from enum import IntEnum

import redis
from redis.cluster import RedisCluster

from queue_schema import keys
from queue_schema.events import Narration, _Event, parse_event
from queue_schema.lifecycle import clock, scripts
from queue_schema.lifecycle.leases import generation
from queue_schema.settings import DEFAULTS

NARRATION_LOG_MAXLEN = 10_000
REFRESH_MEMORY = 10_000  # jobs whose last TTL renewal a process remembers
UNOWNED = ""  # the writer that may write jobs nobody holds a lease on
_STEP, _APPEND, _NARRATE = scripts.load("step"), scripts.load("append"), scripts.load("narrate")
_READ, _FENCE = scripts.load("log_read"), scripts.load("fence")


class Appended(IntEnum):
    """What happened to one job's events in an append."""

    OK = 1
    CLOSED = 0  # the log already ended: nothing written
    FENCED = -1  # the writer does not hold the job's lease: nothing written
    GAP = -2  # the first new seq is past the log's end: nothing written





def _joined(groups) -> tuple[list, list]:
    """Per-job (keys, args) groups as one script call's lists."""
    return [k for ks, _ in groups for k in ks], [a for _, args in groups for a in args]


def final_state(event: _Event) -> str | None:
    """What a terminal event makes of its job (finished, failed, cancelled); None for others."""
    if not event.terminal:
        return None
    if event.type == "end":
        return "cancelled" if event.stop_reason == "cancelled" else "finished"
    return "cancelled" if event.code == "CANCELLED" else "failed"


def entry_seq(entry_id: bytes | str) -> int:
    """The seq of a log entry (a fence's is that of the event before it)."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.rpartition("-")[2])


def logged_events(entries) -> list[_Event]:
    """The events among a log's entries (XRANGE's pairs), fences left out."""
    return [parse_event(fields[b"e"]) for _, fields in entries if b"e" in fields]


LAST_LOOK = 4  # entries read back from a log's end for its last event: a take's fence or two may be last


def last_logged(entries) -> _Event | None:
    """The last event among entries read from a log's end (XREVRANGE's pairs), fences passed over."""
    return next((parse_event(fields[b"e"]) for _, fields in entries if b"e" in fields), None)


class EventLog:
    """Append and replay job events. Safe to share between threads."""

    def __init__(self, client: redis.Redis, ttl_s: int = DEFAULTS.job_ttl_s, queue: redis.Redis | None = None):
        """``client``: the store the logs live on; ``queue``: the queue's Redis, where that is another store
        (INFERQ_EVENTS_URL); ``ttl_s``: how long a job's log lives after its last write (Settings.job_ttl_s)."""
        self.redis = client
        self.queue = client if queue is None else queue
        self.apart = self.queue is not client
        self.clustered = isinstance(client, RedisCluster)
        self.pub = "SPUBLISH" if self.clustered else "PUBLISH"
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
        job they belong to), else as ``writer``. Each job's events must have consecutive seqs. A take's
        events without a terminal one are plain XADDs; the rest go through the checked script. Narration is
        also added to the operators' feed (one more script call in the same pipeline).
        """
        per_job: dict[tuple[str, str], list] = {}
        narration = []
        for event in events:
            data = event.model_dump_json(exclude_none=True)
            if event.job_id is not None:
                run = (event.job_id, event._writer or writer)
                per_job.setdefault(run, []).append((event.seq, event.type, data, final_state(event) or ""))
            if isinstance(event, Narration):
                narration.append(data)
        plain = [run for run, rows in per_job.items() if generation(run[1]) > 0 and not any(r[3] for r in rows)]
        plain_runs = set(plain)
        checked = [run for run in per_job if run not in plain_runs]
        renew = {job_id: self._renewal_due(job_id) for job_id, _ in plain}
        plain_groups = []
        for job_id, by in plain:
            rows = per_job[(job_id, by)]
            plain_groups.append(([keys.job_events(job_id), keys.job_channel(job_id)],
                                 [generation(by), len(rows), "1" if renew[job_id] else "0",
                                  *(x for seq, type_, data, _ in rows for x in (seq, type_, data))]))
        checked_groups = []
        for job_id, by in checked:
            rows = per_job[(job_id, by)]
            job_keys = [keys.job_events(job_id), keys.job_channel(job_id)]
            checked_groups.append((job_keys if self.apart else [*job_keys, keys.job_lease(job_id)],
                                   [job_id, by, len(rows), *(x for row in rows for x in row)]))
        now = clock.now_ms(self.queue) if checked else 0
        if self.apart:
            ending = {job_id: now for job_id, by in checked if any(r[3] for r in per_job[(job_id, by)])}
            pipe = self.queue.pipeline(transaction=False)
            if ending:  # the reaper's to-do list first: a writer that dies after the end leaves it there
                pipe.zadd(keys.SETTLING, ending)
            self._narrate(pipe, narration)
            if len(pipe):
                pipe.execute()
            narration = []
        step_args = {"ttl": self.ttl_s, "pub": self.pub}
        append_args = {"ttl": self.ttl_s, "now": now, "apart": int(self.apart), "pub": self.pub}

        def settling(group) -> dict:
            # Apart, the script touches only the log: its settling key is not used, and the call's first log
            # stands in (on a cluster every key of a call must share the job's slot).
            return {"settling": group[0][0] if self.apart else keys.SETTLING}

        if self.clustered:  # a script's keys must share a slot: one call per job
            step_out = [_STEP(self.redis, {}, step_args, k, a)[0] for k, a in plain_groups]
            append_out = [_APPEND(self.redis, settling((k, a)), append_args, k, a)[0] for k, a in checked_groups]
        else:
            # A pipeline that holds a script first asks Redis whether it has it (redis-py's SCRIPT EXISTS, a
            # round trip of its own): a step's one call goes alone, as EVALSHA.
            alone = bool(plain) and not checked and not narration
            pipe = self.redis if alone else self.redis.pipeline(transaction=False)
            step_out = _STEP(pipe, {}, step_args, *_joined(plain_groups)) if plain else []
            if checked:
                _APPEND(pipe, settling(checked_groups[0]), append_args, *_joined(checked_groups))
            self._narrate(pipe, narration)
            if not alone:
                results = iter(pipe.execute() if len(pipe) else ())
                step_out = next(results) if plain else []
                append_out = next(results) if checked else []
            else:
                append_out = []
        done = {run: Appended(int(status)) for run, status in zip(plain, step_out)}
        done.update({run: Appended(int(status)) for run, status in zip(checked, append_out)})
        self._renewed([job_id for job_id, by in plain if renew[job_id] and done[(job_id, by)] == Appended.OK])
        return {run: done[run] for run in per_job}

    @staticmethod
    def _narrate(pipe, narration: list[str]) -> None:
        for data in narration:
            _NARRATE(pipe, {"log": keys.NARRATION_LOG, "channel": keys.NARRATION_CHANNEL},
                     {"event": data, "maxlen": NARRATION_LOG_MAXLEN})

    def fence(self, job_id: str, owner: str, queued: bytes | str = "") -> tuple[int, int]:
        """The log's side of a take counted on the queue's Redis (only where the log is apart): (the seq the
        take writes next, 1 fenced in / 0 the log was closed / -1 a later take fenced it first). ``queued``: the
        job's ``queued`` event from RQ's job hash, written first if the log does not exist yet."""
        next_seq, state = _FENCE(self.redis, {"log": keys.job_events(job_id)},
                                 {"gen": generation(owner), "owner": owner, "queued": queued, "ttl": self.ttl_s})
        return int(next_seq), int(state)

    def write_queued(self, job_id: str, event: bytes | str) -> None:
        """The ``queued`` event admission left in RQ's job hash, where the log is apart: its first entry
        (refused, and already there, if the job's first take wrote it)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(keys.job_events(job_id), {"t": "queued", "e": event}, id="1-0")
        pipe.expire(keys.job_events(job_id), self.ttl_s)
        try:
            pipe.execute()
        except redis.ResponseError as exc:
            if "equal or smaller" not in str(exc):
                raise

    def _renewal_due(self, job_id: str) -> bool:
        """Whether this write should renew the log's TTL (the checked script renews it at every write)."""
        last = self._refreshed.get(job_id)
        return last is None or time.monotonic() - last >= self._refresh_s

    def _renewed(self, job_ids: list[str]) -> None:
        # Noted only once the write is in: a write that failed (and is retried) still renews.
        if len(self._refreshed) + len(job_ids) > REFRESH_MEMORY:  # jobs long gone: forget them
            self._refreshed.clear()
        now = time.monotonic()
        for job_id in job_ids:
            self._refreshed[job_id] = now

    def entries(self, job_id: str, after_seq: int = -1, count: int = 1_000_000) -> list:
        """Up to ``count`` entries (fences included) after the event ``after_seq``, as XRANGE gives them."""
        key = keys.job_events(job_id)
        if after_seq < 0:
            return self.redis.xrange(key, count=count)
        raw = _READ(self.redis, {"log": key}, {"after": after_seq, "count": count})
        return [(entry_id, dict(zip(flat[::2], flat[1::2]))) for entry_id, flat in raw]

    def replay(self, job_id: str, after_seq: int = -1, until_seq: int | None = None,
               count: int | None = None) -> list[_Event]:
        """Events with ``after_seq < seq`` (and ``seq <= until_seq`` if given), in order; at most ``count``
        (fewer only at the log's end)."""
        want = count or 1_000_000
        if until_seq is not None:  # seqs are consecutive: so many events at most
            want = min(want, max(0, until_seq - after_seq))
            if want == 0:
                return []
        asked = want
        entries = self.entries(job_id, after_seq, asked)
        events = logged_events(entries)
        while entries and len(entries) == asked and len(events) < want:  # fences took places in the page
            asked = want - len(events)
            entries = self.redis.xrange(keys.job_events(job_id), f"({entries[-1][0].decode()}", count=asked)
            events += logged_events(entries)
        return events if until_seq is None else [e for e in events if e.seq <= until_seq]

    def last(self, job_id: str) -> _Event | None:
        """The log's last event (fences are passed over)."""
        key, end = keys.job_events(job_id), "+"
        while True:
            entries = self.redis.xrevrange(key, end, count=LAST_LOOK)
            last = last_logged(entries)
            if last is not None or len(entries) < LAST_LOOK:
                return last
            end = f"({entries[-1][0].decode()}"

    def next_seq(self, job_id: str) -> int:
        """The seq the next event takes: past the last entry, a take's fence included."""
        entries = self.redis.xrevrange(keys.job_events(job_id), count=1)
        return entry_seq(entries[0][0]) + 1 if entries else 0

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.job_events(job_id)))

    def recent_narration(self, count: int = 100) -> list[_Event]:
        if count <= 0:
            return []
        entries = self.queue.xrevrange(keys.NARRATION_LOG, count=count)  # narration stays on the queue's Redis
        return [parse_event(fields[b"e"]) for _, fields in reversed(entries)]
