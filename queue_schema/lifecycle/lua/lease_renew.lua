-- The owner renews its leases (bumps their renewal count); 1 per lease it still holds, else 0.
-- ARGV: owner
-- Then KEYS: the leases.
local out = {}
for i = K_REST, #KEYS do
  local lease = KEYS[i]
  if redis.call('HGET', lease, 'owner') == A.owner then
    redis.call('HINCRBY', lease, 'renewals', 1)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
