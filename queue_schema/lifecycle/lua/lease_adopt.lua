-- Lease a job that shows as running but has no lease (one lost in a Redis restart), so it can be closed.
-- KEYS: lease leases
-- ARGV: owner id now_ms
if redis.call('EXISTS', K.lease) == 1 then return 0 end
redis.call('HSET', K.lease, 'owner', A.owner, 'renewals', 0, 'taken_ms', A.now_ms)
redis.call('ZADD', K.leases, A.now_ms, A.id)
return 1
