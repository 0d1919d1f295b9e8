-- Move a lease from its owner to another writer (a worker handing its own job to its reaper identity), as a
-- new generation: the new owner string, or "" if `owner` no longer held it.
-- KEYS: lease
-- ARGV: id owner new_owner apart
-- USES: keys log
if (redis.call('HGET', K.lease, 'owner') or '') ~= A.owner then return '' end
local owner = LOG.take(KEY.job_events(A.id), KEY.rq_job(A.id), A.new_owner, nil, A.apart == '1')
redis.call('HSET', K.lease, 'owner', owner, 'renewals', 0)
return owner
