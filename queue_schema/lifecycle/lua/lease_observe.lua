-- Every lease's owner and renewal count, for the reaper's watch: {id, owner, renewals} each.
-- KEYS: leases
-- ARGV: limit
-- USES: keys
local out = {}
for _, id in ipairs(redis.call('ZRANGE', K.leases, 0, tonumber(A.limit) - 1)) do
  local lease = redis.call('HMGET', KEY.job_lease(id), 'owner', 'renewals')
  out[#out + 1] = {id, lease[1] or '', lease[2] or ''}
end
return out
