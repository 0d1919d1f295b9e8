-- Owners renew their leases (bump their renewal counts); 1 per lease its owner still holds, else 0.
-- Then KEYS: the leases; ARGV: their owners ("<worker>#<generation>"), in the same order.
local out = {}
for i = K_REST, #KEYS do
  local lease = KEYS[i]
  if redis.call('HGET', lease, 'owner') == ARGV[A_REST + i - K_REST] then
    redis.call('HINCRBY', lease, 'renewals', 1)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
