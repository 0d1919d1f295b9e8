-- Lease a job that shows as running but has no lease (one lost in a Redis restart), so it can be closed, as a
-- new generation: the owner string, or "" if it has a lease.
-- KEYS: lease leases
-- ARGV: owner id now_ms apart
-- USES: keys log
if redis.call('EXISTS', K.lease) == 1 then return '' end
local owner = LOG.take(KEY.job_events(A.id), KEY.rq_job(A.id), A.owner, nil, A.apart == '1')
redis.call('HSET', K.lease, 'owner', owner, 'renewals', 0, 'taken_ms', A.now_ms)
redis.call('ZADD', K.leases, A.now_ms, A.id)
return owner
