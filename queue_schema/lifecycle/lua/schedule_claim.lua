-- Claim due members of a schedule (queue_schema/lifecycle/schedule.py): lapsed claims are due again first;
-- each claimed member moves to `claimed` until its claim ends. Answers {claim end (ms), members}.
-- KEYS: due claimed
-- ARGV: now claim_ms count
local now = tonumber(A.now)
for _, member in ipairs(redis.call('ZRANGEBYSCORE', K.claimed, '-inf', now)) do
  redis.call('ZREM', K.claimed, member)
  redis.call('ZADD', K.due, now, member)
end
local until_ms = now + tonumber(A.claim_ms)
local out = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', K.due, '-inf', now, 'LIMIT', 0, tonumber(A.count))) do
  redis.call('ZREM', K.due, member)
  redis.call('ZADD', K.claimed, until_ms, member)
  out[#out + 1] = member
end
return {until_ms, out}
