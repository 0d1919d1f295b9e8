-- A new batch (api/batch_store.py), unless its tenant is at a bound: {0, open, max} for its batches in flight,
-- {-1, bytes, max} for the bytes of its batch results and outputs; {1} created. Members of the open set whose
-- batch ended (or expired) are dropped first: the set holds at most the bound, so a batch lost to a Redis that
-- lost writes cannot block its tenant for good.
-- KEYS: open files batch index due
-- ARGV: max_open max_bytes final id now keep_ms
-- USES: keys
-- Then ARGV: the batch hash's field/value pairs.
local final = {}
for s in string.gmatch(A.final, '[^,]+') do final[s] = true end
local held, open = 0, 0
for _, id in ipairs(redis.call('SMEMBERS', K.open)) do
  local b = redis.call('HMGET', KEY.batch(id), 'status', 'result_bytes')
  if not b[1] or final[b[1]] then
    redis.call('SREM', K.open, id)
  else
    open = open + 1
    held = held + (tonumber(b[2]) or 0)
  end
end
local max_open, max_bytes = tonumber(A.max_open), tonumber(A.max_bytes)
if max_open > 0 and open >= max_open then return {0, open, max_open} end
for _, id in ipairs(redis.call('ZRANGE', K.files, 0, -1)) do
  local f = redis.call('HMGET', KEY.file(id), 'purpose', 'bytes')
  if f[1] == 'batch_output' then held = held + (tonumber(f[2]) or 0) end
end
if max_bytes > 0 and held >= max_bytes then return {-1, held, max_bytes} end
local fields = {}
for i = A_REST, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', K.batch, unpack(fields))
redis.call('SADD', K.open, A.id)
redis.call('ZADD', K.index, A.now, A.id)
redis.call('ZREMRANGEBYSCORE', K.index, '-inf', tonumber(A.now) - tonumber(A.keep_ms))
redis.call('ZADD', K.due, A.now, A.id)
return {1}
