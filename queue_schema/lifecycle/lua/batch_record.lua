-- Results kept once each (HSETNX), counted, and their bytes added to the batch's `result_bytes`, unless the
-- tenant's open batches already hold `max_bytes` of results: then the line's small fallback (a quota error)
-- is kept instead, so one tenant's batch cannot fill Redis. Answers how many were new.
-- KEYS: batch results open
-- ARGV: max_bytes
-- USES: keys
-- Then ARGV, per line: line, result json, "completed" | "failed", the bytes its output line will take,
-- fallback json.
local max_bytes = tonumber(A.max_bytes)
local held = 0
if max_bytes > 0 then
  for _, id in ipairs(redis.call('SMEMBERS', K.open)) do
    held = held + (tonumber(redis.call('HGET', KEY.batch(id), 'result_bytes')) or 0)
  end
end
local added = 0
for i = A_REST, #ARGV, 5 do
  local result, status, size = ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  if max_bytes > 0 and held + size > max_bytes then
    result, status, size = ARGV[i + 4], 'failed', #ARGV[i + 4]
  end
  if redis.call('HSETNX', K.results, ARGV[i], result) == 1 then
    redis.call('HINCRBY', K.batch, status, 1)
    redis.call('HINCRBY', K.batch, 'result_bytes', size)
    held = held + size
    added = added + 1
  end
end
return added
