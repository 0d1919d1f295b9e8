"""A durable schedule any inferq process can work through: due times in Redis, exclusive claims.

Webhook deliveries and batches are advanced by whichever process gets to
them (every API process runs the loop, ``api/background.py``), so their
progress lives in Redis, never in a process. A schedule is two sorted sets:
``due`` (member -> when it is due, ms) and ``claimed`` (member -> when the
claim lapses). ``claim`` moves due members to ``claimed`` in one script, so
two processes never take one member at once; the claimer then ``reschedule``s
or ``finish``es it, a compare-and-set on the claim it got (a claim that lapsed
and was taken by another process is no longer its to settle). A claimer that
dies leaves its claim to lapse: the next ``claim`` makes the member due
again, so the work is done at least once.
"""
from __future__ import annotations

from dataclasses import dataclass

import redis

from queue_schema.lifecycle import scripts

_CLAIM, _SETTLE = scripts.load("schedule_claim"), scripts.load("schedule_settle")


@dataclass(frozen=True)
class Claim:
    member: str
    until_ms: int


class Schedule:
    def __init__(self, client: redis.Redis, due_key: str, claimed_key: str, claim_ms: int = 60_000):
        self.redis = client
        self.due_key, self.claimed_key, self.claim_ms = due_key, claimed_key, claim_ms
        self._keys = {"due": due_key, "claimed": claimed_key}

    def add(self, member: str, due_ms: int, pipe=None) -> None:
        """Make ``member`` due at ``due_ms`` (``pipe``: as part of a caller's transaction)."""
        (pipe or self.redis).zadd(self.due_key, {member: due_ms})

    def claim(self, now_ms: int, count: int = 20) -> list[Claim]:
        until_ms, members = _CLAIM(self.redis, self._keys, {"now": now_ms, "claim_ms": self.claim_ms, "count": count})
        return [Claim(m.decode(), int(until_ms)) for m in members]

    def reschedule(self, claim: Claim, due_ms: int) -> bool:
        """Give the claim back, due again at ``due_ms``; False if it had lapsed and was taken."""
        return bool(_SETTLE(self.redis, self._keys, {"member": claim.member, "until_ms": claim.until_ms,
                                                     "next_due": due_ms}))

    def finish(self, claim: Claim) -> bool:
        """Done with ``member`` for good; False if the claim had lapsed and was taken."""
        return bool(_SETTLE(self.redis, self._keys, {"member": claim.member, "until_ms": claim.until_ms,
                                                     "next_due": ""}))

