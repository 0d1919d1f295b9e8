"""Which layout of job logs a process writes, so that two layouts never share a Redis.

Job log entry ids were ``<seq>-1`` and are ``<generation>-<seq>`` (eventlog.py, format
2); the log's keys then gained the job id as a hash tag, ``inferq:job:{id}:events``,
so an events cluster keeps a job's keys in one slot (format 3). A process of one
layout misreads the other's seqs, or looks for its logs under other names, so a
fleet crosses with a stop-and-drain upgrade
(docs/DESIGN.md, Upgrades). A worker checks at start, before its first record, and
refuses with one line while either is true:

- a live worker of another layout is running (an older one's record says none);
- an open job's log was written in an old layout (under its old name, or its entries have no type field).
"""
from __future__ import annotations

import json

import redis

from queue_schema import keys
from queue_schema.errors import ConfigError
from queue_schema.lifecycle import registry

LOG_FORMAT = 3  # records.WorkerInfo.log_format defaults to it
OLD_LOOK = 100  # open jobs looked at, newest first: old ones are long drained or reaped


def check(client: redis.Redis, worker_id: str | None = None, events: redis.Redis | None = None) -> None:
    """Refuse (ConfigError) to run beside processes or open jobs of another log layout."""
    # An older worker's record has no log_format at all (the field's default would read it as this one's).
    records = [json.loads(blob) for blob in registry.live_worker_records(client)]
    others = [w["id"] for w in records if w.get("log_format", 1) != LOG_FORMAT and w["id"] != worker_id]
    if others:
        raise ConfigError(f"workers {', '.join(sorted(others)[:5])} write job logs in another layout: this "
                          "version needs a stop-and-drain upgrade (stop every worker and API process of the "
                          "old version first; docs/DESIGN.md, Upgrades)")
    open_jobs = [j.decode() for j in client.zrevrange(keys.OPEN_JOBS, 0, OLD_LOOK - 1)]
    if not open_jobs:
        return
    pipe = client.pipeline(transaction=False)  # the old names were only ever on the queue's Redis
    for job_id in open_jobs:
        pipe.exists(keys.old_job_events(job_id))
    old = [job_id for job_id, there in zip(open_jobs, pipe.execute()) if there]
    pipe = (client if events is None else events).pipeline(transaction=False)
    for job_id in open_jobs:
        pipe.xrevrange(keys.job_events(job_id), count=1)
    old += [job_id for job_id, top in zip(open_jobs, pipe.execute())
            if top and b"t" not in top[0][1] and b"f" not in top[0][1]]
    if old:
        raise ConfigError(f"{len(old)} open jobs (e.g. {old[0]}) have job logs in the old layout: let them end "
                          "or cancel them, with the old version still running, before starting this one "
                          "(docs/DESIGN.md, Upgrades)")
