-- Put a tenant queue with jobs back in its ring (checked again here: the lease script may have emptied it).
-- KEYS: ring queue
-- ARGV: name
if redis.call('LLEN', K.queue) > 0 and not redis.call('LPOS', K.ring, A.name) then
  redis.call('RPUSH', K.ring, A.name)
end
return 1
