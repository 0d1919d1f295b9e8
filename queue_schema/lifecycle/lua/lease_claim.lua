-- Take a lease over if it still stands exactly as the reaper saw it (owner and renewals), as a new generation
-- of the job (lease_acquire.lua): the new owner string, or "" if the lease moved on.
-- KEYS: lease
-- ARGV: id owner renewals new_owner apart
-- USES: keys log
local lease = redis.call('HMGET', K.lease, 'owner', 'renewals')
if (lease[1] or '') ~= A.owner or (lease[2] or '') ~= A.renewals then return '' end
local owner = LOG.take(KEY.job_events(A.id), KEY.rq_job(A.id), A.new_owner, nil, A.apart == '1')
redis.call('HSET', K.lease, 'owner', owner, 'renewals', 0)
return owner
