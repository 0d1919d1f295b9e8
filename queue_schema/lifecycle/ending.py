"""The one way a job ends: its terminal event, then an idempotent settle that anyone can retry.

Every ending goes through here, whoever ends the job: the worker (its
publisher appends the terminal event with the step's others, then calls
``settle``), the reaper (a lost worker's job, an orphan rq-dashboard deleted
or cancelled), the API (a job cancelled while queued), and the reaper's
sweep of jobs whose end was written but not settled. It is two steps, as
RQ's ``handle_job_failure`` is one path its registry cleanup reuses:

1. **The terminal event**, appended to the job's log (``lua/append.lua``),
   which closes the log (exactly one ``end`` or ``error``) and puts the job
   on the settling set.
2. **The settle**, keyed by job: RQ's books (finished, failed or cancelled,
   written once: a job RQ already shows ended is left as it is), then one
   script (``lua/settle.lua``) for what hangs on the end in inferq's own keys:
   the lease of record and the job's places in the leases and open-jobs
   indexes, its tenant's queued and running sets and counters, the model's
   outcome counter, the webhook delivery, the batch line's hand-off. The
   script acts only for the call that takes the job off the settling set, so
   a settle done twice does nothing more.

A writer that dies between the two leaves the job on the settling set, and
the reaper settles it from its log. The two steps touch different keys, so
the log can move to another Redis (the scale-out issue) without this
changing shape.
"""
from __future__ import annotations

import logging

import redis
from rq.executions import Execution

from queue_schema import keys
from queue_schema.events import _Event
from queue_schema.lifecycle import books, clock, scripts
from queue_schema.lifecycle.eventlog import UNOWNED, Appended, EventLog, final_state

log = logging.getLogger(__name__)
# A webhook delivery's record expires this long after the settle made it, sent or not: with no API process
# able to sign it, nothing else would end it (api/webhooks.py gives up on a delivery after 24 h).
WEBHOOK_RECORD_TTL_S = 48 * 3600
_SETTLE = scripts.load("settle")


class Ending:
    """Ends jobs and settles them; safe to share between threads."""

    def __init__(self, client: redis.Redis, eventlog: EventLog):
        self.redis, self.eventlog = client, eventlog

    def end(self, event: _Event, writer: str = UNOWNED) -> Appended:
        """Append ``event`` (terminal) as ``writer``, then settle the job; what the log said."""
        status = self.eventlog.append(event, writer)
        if status == Appended.OK:
            self.settle(event.job_id, event)
        return status

    def settle(self, job_id: str, terminal: _Event | None = None, *, summary: dict | None = None,
               reason: str | None = None, worker_name: str = "", execution: Execution | None = None) -> bool:
        """Settle what hangs on the end of ``job_id`` (whose log ended with ``terminal``: read from the log when
        not given). True for the call that settled it; False if it was settled already, or has not ended."""
        terminal = terminal if terminal is not None else self.eventlog.last(job_id)
        if terminal is None or not terminal.terminal:
            return False
        job = books.fetch(self.redis, job_id)
        if job is not None:
            pipe = self.redis.pipeline()
            if books.close(pipe, job, terminal, summary, reason, worker_name, execution):
                pipe.execute()
        return bool(_SETTLE(self.redis, {"settling": keys.SETTLING, "leases": keys.LEASES,
                                         "open_jobs": keys.OPEN_JOBS, "tenant_counters": keys.TENANT_COUNTERS,
                                         "counters": keys.COUNTERS, "webhooks_due": keys.WEBHOOKS_DUE,
                                         "batches_due": keys.BATCHES_DUE, "batches_claimed": keys.BATCHES_CLAIMED},
                            {"job": job_id, "state": final_state(terminal), "now": clock.now_ms(self.redis),
                             "record_ttl": WEBHOOK_RECORD_TTL_S, "info_ttl": self.eventlog.ttl_s,
                             "settled_ttl": self.eventlog.ttl_s}))

    def unsettled(self, older_than_ms: int, limit: int = 500) -> list[str]:
        """Jobs whose log ended more than ``older_than_ms`` ago and whose end is not settled: their writer died
        between the two steps (the reaper settles them)."""
        cutoff = clock.now_ms(self.redis) - older_than_ms
        return [j.decode() for j in self.redis.zrangebyscore(keys.SETTLING, "-inf", cutoff, start=0, num=limit)]
