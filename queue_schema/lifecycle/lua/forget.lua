-- Drop an Idempotency-Key if it still names `job` (a request that made several jobs and had one refused).
-- KEYS: idem
-- ARGV: job
local prior = redis.call('GET', K.idem)
if prior and string.sub(prior, 1, #A.job + 1) == A.job .. ' ' then return redis.call('DEL', K.idem) end
return 0
