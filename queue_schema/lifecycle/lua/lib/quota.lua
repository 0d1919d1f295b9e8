-- A tenant's batch quota use, the one place it is counted (batch_create.lua, batch_usage.lua): its batches in
-- flight and the bytes of its batch results and outputs. Members of the open set whose batch ended (or
-- expired) are dropped first, so a batch lost to a Redis that lost writes cannot block its tenant for good.
-- Needs the keys library (KEY.batch, KEY.file).
local QUOTA = {}

function QUOTA.batch_use(open_key, files_key, final_csv)
  local final = {}
  for s in string.gmatch(final_csv, '[^,]+') do final[s] = true end
  local held, open = 0, 0
  for _, id in ipairs(redis.call('SMEMBERS', open_key)) do
    local b = redis.call('HMGET', KEY.batch(id), 'status', 'result_bytes')
    if not b[1] or final[b[1]] then
      redis.call('SREM', open_key, id)
    else
      open = open + 1
      held = held + (tonumber(b[2]) or 0)
    end
  end
  for _, id in ipairs(redis.call('ZRANGE', files_key, 0, -1)) do
    local f = redis.call('HMGET', KEY.file(id), 'purpose', 'bytes')
    if f[1] == 'batch_output' then held = held + (tonumber(f[2]) or 0) end
  end
  return open, held
end
