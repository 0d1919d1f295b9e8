"""Listing a tenant's jobs, newest first, from its job index (``keys.tenant_jobs``).

Admission adds every job to its tenant's index (and to the index of all
jobs, which admins list) by submit time in microseconds (so one client's
back-to-back submits keep their order), trims entries older than twice the
job TTL and lets an idle index expire. A job can outlive its entry's horizon
only by waiting longer than a TTL in its queue, and an entry can outlive its
job (the log expired): those are dropped here when a listing meets them.

The cursor is ``<submitted µs>_<job id>`` of the last job returned: stable
while new jobs arrive (they are newer, so before it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle import views as jobs

CHUNK = 100
SCAN_MAX = 2000  # entries looked at per call when filters skip most: the client follows next_cursor


@dataclass
class Page:
    data: list[jobs.JobView]
    has_more: bool
    next_cursor: str | None


def parse_cursor(cursor: str | None) -> tuple[float, str] | None:
    if not cursor:
        return None
    score, sep, job_id = cursor.partition("_")
    try:
        value = float(score)
    except ValueError:
        value = None
    # float() reads "nan" and "inf", which Redis refuses as a score: a 500 otherwise.
    if not sep or not job_id or value is None or not math.isfinite(value):
        raise InferqError(ErrorCode.INVALID_REQUEST, "cursor must be a next_cursor this API returned",
                          errors=[{"field": "cursor", "constraint": "format", "message": "not a cursor"}])
    return value, job_id


def page(client: redis.Redis, index_key: str, *, state: str | None = None, model: str | None = None,
         limit: int = 20, cursor: str | None = None, events: redis.Redis | None = None) -> Page:
    after = parse_cursor(cursor)
    high = "+inf" if after is None else repr(after[0])
    found: list[tuple[jobs.JobView, str]] = []
    scanned, offset = 0, 0
    last_cursor = None
    while scanned < SCAN_MAX:
        rows = client.zrevrangebyscore(index_key, high, "-inf", start=offset, num=CHUNK, withscores=True)
        if not rows:
            return Page([v for v, _ in found[:limit]], False, None)
        offset += len(rows)
        entries = []
        for member, score in rows:
            job_id = member.decode()
            # Equal scores come in reverse order of id: those at or above the cursor's id were sent.
            if after is not None and score == after[0] and job_id >= after[1]:
                continue
            entries.append((job_id, score))
        scanned += len(rows)
        gone = []
        for (job_id, score), view in zip(entries, jobs.views(client, [j for j, _ in entries], events)):
            last_cursor = f"{int(score)}_{job_id}"
            if view is None:
                gone.append(job_id)
                continue
            if (state is None or view.state == state) and (model is None or view.model == model):
                found.append((view, last_cursor))
                if len(found) > limit:
                    if gone:
                        client.zrem(index_key, *gone)
                    return Page([v for v, _ in found[:limit]], True, found[limit - 1][1])
        if gone:
            client.zrem(index_key, *gone)
            offset -= len(gone)  # the entries after them moved up
    # Looked at enough for one answer: the client goes on from where this one stopped.
    return Page([v for v, _ in found], True, last_cursor)
