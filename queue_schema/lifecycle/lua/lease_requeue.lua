-- Give a job back to the front of its queue (and its queue to the front of its ring) if `owner` holds its
-- lease; it moves back from its limit key's running set to its queued set, and the model's idle workers wake.
-- The giving take is fenced off the log here (log.lua), not at the next take: it may still be writing. Answers
-- the fence's owner string ("queue#<generation>": the caller fences a log on the events store with it), or "".
-- KEYS: lease leases queue job wake ring info
-- ARGV: owner job queue_name apart
-- USES: keys log
if (redis.call('HGET', K.lease, 'owner') or '') ~= A.owner then return '' end
local fence = LOG.take(KEY.job_events(A.job), K.job, 'queue', nil, A.apart == '1')
redis.call('DEL', K.lease)
redis.call('ZREM', K.leases, A.job)
redis.call('HSET', K.job, 'status', 'queued', 'worker_name', '')
if redis.call('LPUSH', K.queue, A.job) == 1 then
  redis.call('LREM', K.ring, 0, A.queue_name)
  redis.call('LPUSH', K.ring, A.queue_name)
end
local limit = redis.call('HGET', K.info, 'limit')
if limit then
  redis.call('SREM', KEY.limit_running(limit), A.job)
  redis.call('SADD', KEY.limit_queued(limit), A.job)
end
redis.call('RPUSH', K.wake, 1)
redis.call('LTRIM', K.wake, -64, -1)
return fence
