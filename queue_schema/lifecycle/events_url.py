"""One store for the fleet's job logs: ``INFERQ_EVENTS_URL``, or the queue's own Redis when unset.

A worker writes a job's log where its own setting says, and an API process
reads it where its own says: two processes that disagree lose logs without an
error. So each one claims its store on the queue's Redis as it starts
(``claim``), says so again with its heartbeats (``renew``), and leaves at a
clean shutdown (``leave``). The fleet's store (``keys.EVENTS_STORE``) changes
only once no process of another store has been seen for ``USER_TTL_MS`` and no
job is open: an open job's log stays on the store it began on.
Stores are named by ``connection.store_identity``, so no password is kept.
"""
from __future__ import annotations

import os

from queue_schema import keys
from queue_schema.errors import ConfigError
from queue_schema.lifecycle import scripts

ENV = "INFERQ_EVENTS_URL"
# Several heartbeats: a live process renews every few seconds, and one that died
# without leaving stops holding the store back half a minute later.
USER_TTL_MS = 30_000
FIX = ("give every process the same INFERQ_EVENTS_URL, or stop them all and let the open jobs drain "
       "(docs/DESIGN.md, Scale-out)")


class EventsStoreMismatch(ConfigError):
    """This process names another store for the job logs than the fleet uses; the message is one line."""


def from_env(env=None) -> str | None:
    value = (os.environ if env is None else env).get(ENV, "").strip()
    return value or None


def claim(queue_client, identity: str, process: str, now_ms: int) -> None:
    """Join the users of ``identity``'s store, switching the fleet to it if nothing holds the old one."""
    answer = scripts.load("events_claim")(
        queue_client, keys={"store": keys.EVENTS_STORE, "users": keys.EVENTS_USERS, "open_jobs": keys.OPEN_JOBS},
        args={"identity": identity, "process": process, "now_ms": now_ms, "ttl_ms": USER_TTL_MS})
    if answer[0] == 0:
        return
    store = _text(answer[1])
    if answer[0] == 1:
        other, _, who = _text(answer[2]).partition("\t")
        why = f"a process using {_name(other)} is running ({who})"
    else:
        why = f"{answer[2]} open job{'s have their' if answer[2] != 1 else ' has its'} logs there"
    raise EventsStoreMismatch(f"this process keeps job logs on {_name(identity)}, but the fleet keeps them on "
                              f"{_name(store)} and {why}: {FIX}")


def renew(queue_client, identity: str, process: str, now_ms: int) -> None:
    """Say again that this process uses ``identity``'s store (one round trip)."""
    pipe = queue_client.pipeline(transaction=False)
    pipe.zadd(keys.EVENTS_USERS, {f"{identity}\t{process}": now_ms})
    pipe.get(keys.EVENTS_STORE)
    store = pipe.execute()[1]
    if store is None:  # the queue's Redis lost its data (a restart without persistence): claim again
        return claim(queue_client, identity, process, now_ms)
    if _text(store) != identity:
        # Only after this process went unseen past USER_TTL_MS (paused, cut off) can the fleet have moved. Its
        # entry goes again, or the fleet's next restart would see it as a user of the old store.
        leave(queue_client, identity, process)
        raise EventsStoreMismatch(f"this process keeps job logs on {_name(identity)}, but the fleet moved them to "
                                  f"{_name(_text(store))} while it went unseen: {FIX}")


def leave(queue_client, identity: str, process: str) -> None:
    queue_client.zrem(keys.EVENTS_USERS, f"{identity}\t{process}")


def _name(identity: str) -> str:
    return identity or "the queue's own Redis"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
