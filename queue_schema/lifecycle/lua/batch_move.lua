-- Compare-and-set of a batch's status: 1 if it was in one of `from` (comma-separated) and is now `to`.
-- KEYS: batch
-- ARGV: from to
-- Then ARGV: field/value pairs written with the move.
local status = redis.call('HGET', K.batch, 'status')
if not status then return 0 end
local allowed = false
for s in string.gmatch(A.from, '[^,]+') do if s == status then allowed = true end end
if not allowed then return 0 end
redis.call('HSET', K.batch, 'status', A.to)
for i = A_REST, #ARGV, 2 do redis.call('HSET', K.batch, ARGV[i], ARGV[i + 1]) end
return 1
