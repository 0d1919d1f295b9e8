-- A new batch (api/batch_store.py), unless its tenant is at a bound: {0, open, max} for its batches in flight,
-- {-1, bytes, max} for the bytes of its batch results and outputs; {1} created (the use counted by
-- lib/quota.lua).
-- KEYS: open files batch index due tenants
-- ARGV: max_open max_bytes final id now keep_ms tenant
-- USES: keys quota
-- Then ARGV: the batch hash's field/value pairs.
local open, held = QUOTA.batch_use(K.open, K.files, A.final)
local max_open, max_bytes = tonumber(A.max_open), tonumber(A.max_bytes)
if max_open > 0 and open >= max_open then return {0, open, max_open} end
if max_bytes > 0 and held >= max_bytes then return {-1, held, max_bytes} end
local fields = {}
for i = A_REST, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', K.batch, unpack(fields))
redis.call('SADD', K.open, A.id)
redis.call('ZADD', K.index, A.now, A.id)
redis.call('ZREMRANGEBYSCORE', K.index, '-inf', tonumber(A.now) - tonumber(A.keep_ms))
redis.call('ZADD', K.due, A.now, A.id)
redis.call('SADD', K.tenants, A.tenant)
return {1}
