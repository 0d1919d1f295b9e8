-- Members of a limit key's sets whose job is gone or ended (out of the open-jobs index: its end settled): only a Redis that lost writes leaves any (every
-- script that ends or moves a job keeps them). Then the limit key itself leaves the tenants hash once nothing
-- of it is left (no job, no bucket): with auth off there is one per client address, and the hash would grow
-- for ever; admission writes it again at the key's next submit. Answers how many members were dropped.
-- KEYS: queued running bucket tenants open_jobs
-- ARGV: limit_key
-- USES: keys
local dropped = 0
for _, id in ipairs(redis.call('SMEMBERS', K.queued)) do
  if not redis.call('ZSCORE', K.open_jobs, id) then
    redis.call('SREM', K.queued, id)
    dropped = dropped + 1
  end
end
for _, id in ipairs(redis.call('SMEMBERS', K.running)) do
  if redis.call('EXISTS', KEY.job_lease(id)) == 0 then
    redis.call('SREM', K.running, id)
    dropped = dropped + 1
  end
end
if redis.call('EXISTS', K.queued, K.running, K.bucket) == 0 then redis.call('HDEL', K.tenants, A.limit_key) end
return dropped
