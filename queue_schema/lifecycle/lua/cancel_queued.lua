-- Take a queued job out of its queue if no worker holds it: 1 done, 0 a worker runs it, -1 it is in no queue
-- (a worker is taking it, or it ended).
-- KEYS: lease queue job
-- ARGV: id
if redis.call('EXISTS', K.lease) == 1 then return 0 end
if redis.call('LREM', K.queue, 0, A.id) == 0 then return -1 end
redis.call('HSET', K.job, 'status', 'canceled')
return 1
