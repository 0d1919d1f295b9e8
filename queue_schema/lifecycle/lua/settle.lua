-- What hangs on a job's end, settled once (queue_schema/lifecycle/ending.py): its lease of record and its
-- places in the leases and open-jobs indexes go; it leaves its limit key's queued and running sets; it is
-- counted by tenant and by model; a webhook delivery is made due if it has one, and its batch told if it is
-- a batch line. Idempotent: only the first call does it (1), guarded by the job's settled mark, not by the
-- settling set (a to-do list the reaper reads: where the log lives on the events store, the writer puts the job
-- there before it writes the end, and a sweep may see it before the end is in); any later call (a retry after
-- a lost reply, the reaper's sweep) answers 0.
-- KEYS: settling leases open_jobs tenant_counters counters webhooks_due batches_due batches_claimed
-- ARGV: job state now record_ttl info_ttl settled_ttl
-- USES: keys
redis.call('ZREM', K.settling, A.job)
if not redis.call('SET', KEY.job_settled(A.job), 1, 'NX', 'EX', A.settled_ttl) then return 0 end
local job, state, now = A.job, A.state, A.now
redis.call('DEL', KEY.job_lease(job))
redis.call('ZREM', K.leases, job)
redis.call('ZREM', K.open_jobs, job)
local info = KEY.job_info(job)
local meta = redis.call('HMGET', info, 'tenant', 'limit', 'webhook', 'batch', 'model')
local tenant, limit, webhook, batch, model = meta[1], meta[2], meta[3], meta[4], meta[5]
if limit then
  redis.call('SREM', KEY.limit_queued(limit), job)
  redis.call('SREM', KEY.limit_running(limit), job)
end
if tenant then redis.call('HINCRBY', K.tenant_counters, state .. '|' .. tenant, 1) end
if model then redis.call('HINCRBY', K.counters, state .. '|' .. model, 1) end
if webhook then
  local delivery = 'job_' .. job
  local record = KEY.webhook(delivery)
  redis.call('HSET', record, 'url', webhook, 'type', 'job.' .. state, 'target', job, 'state', state,
             'tenant', tenant or '', 'created', now)
  redis.call('EXPIRE', record, A.record_ttl)
  redis.call('ZADD', K.webhooks_due, now, delivery)
end
if batch then
  redis.call('RPUSH', KEY.batch_ended(batch), job)
  if not redis.call('ZSCORE', K.batches_claimed, batch) then redis.call('ZADD', K.batches_due, now, batch) end
end
if tenant then redis.call('EXPIRE', info, A.info_ttl) end
return 1
