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

# KEYS: due, claimed. ARGV: now (ms), claim length (ms), how many.
_CLAIM = """
local now = tonumber(ARGV[1])
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZADD', KEYS[1], now, member)
end
local until_ms = now + tonumber(ARGV[2])
local out = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZADD', KEYS[2], until_ms, member)
  out[#out + 1] = member
end
return {until_ms, out}
"""
# KEYS: due, claimed. ARGV: member, the claim's end (ms), next due (ms) or "" to finish.
_SETTLE = """
if tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or -1) ~= tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
return 1
"""


@dataclass(frozen=True)
class Claim:
    member: str
    until_ms: int


class Schedule:
    def __init__(self, client: redis.Redis, due_key: str, claimed_key: str, claim_ms: int = 60_000):
        self.redis = client
        self.due_key, self.claimed_key, self.claim_ms = due_key, claimed_key, claim_ms
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE)

    def add(self, member: str, due_ms: int, pipe=None) -> None:
        """Make ``member`` due at ``due_ms`` (``pipe``: as part of a caller's transaction)."""
        (pipe or self.redis).zadd(self.due_key, {member: due_ms})

    def claim(self, now_ms: int, count: int = 20) -> list[Claim]:
        until_ms, members = self._claim(keys=[self.due_key, self.claimed_key], args=[now_ms, self.claim_ms, count])
        return [Claim(m.decode(), int(until_ms)) for m in members]

    def reschedule(self, claim: Claim, due_ms: int) -> bool:
        """Give the claim back, due again at ``due_ms``; False if it had lapsed and was taken."""
        return bool(self._settle(keys=[self.due_key, self.claimed_key], args=[claim.member, claim.until_ms, due_ms]))

    def finish(self, claim: Claim) -> bool:
        """Done with ``member`` for good; False if the claim had lapsed and was taken."""
        return bool(self._settle(keys=[self.due_key, self.claimed_key], args=[claim.member, claim.until_ms, ""]))

    def pending(self) -> int:
        return int(self.redis.zcard(self.due_key)) + int(self.redis.zcard(self.claimed_key))
