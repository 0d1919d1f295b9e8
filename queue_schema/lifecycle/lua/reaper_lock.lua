-- The reaper's role, held by one process at a time: taken or kept (1) unless another holds it (0).
-- KEYS: lock
-- ARGV: holder ttl_ms
local holder = redis.call('GET', K.lock)
if holder and holder ~= A.holder then return 0 end
redis.call('SET', K.lock, A.holder, 'PX', A.ttl_ms)
return 1
