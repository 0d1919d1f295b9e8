-- Settle a claim if it is still the one this process got: finished (next_due "") or due again at next_due.
-- 0 if the claim had lapsed and another process took the member.
-- KEYS: due claimed
-- ARGV: member until_ms next_due
if tonumber(redis.call('ZSCORE', K.claimed, A.member) or -1) ~= tonumber(A.until_ms) then return 0 end
redis.call('ZREM', K.claimed, A.member)
if A.next_due ~= '' then redis.call('ZADD', K.due, A.next_due, A.member) end
return 1
