-- Give the reaper's role back, if this holder has it.
-- KEYS: lock
-- ARGV: holder
if redis.call('GET', K.lock) == A.holder then redis.call('DEL', K.lock) end
return 1
