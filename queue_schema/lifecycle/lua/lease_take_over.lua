-- Move a lease from its owner to another writer (a worker handing its own job to its reaper identity).
-- KEYS: lease
-- ARGV: owner new_owner
if (redis.call('HGET', K.lease, 'owner') or '') ~= A.owner then return 0 end
redis.call('HSET', K.lease, 'owner', A.new_owner, 'renewals', 0)
return 1
