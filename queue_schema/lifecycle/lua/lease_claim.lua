-- Take a lease over if it still stands exactly as the reaper saw it (owner and renewals): 1 taken, 0 moved on.
-- KEYS: lease
-- ARGV: owner renewals new_owner
local lease = redis.call('HMGET', K.lease, 'owner', 'renewals')
if (lease[1] or '') ~= A.owner or (lease[2] or '') ~= A.renewals then return 0 end
redis.call('HSET', K.lease, 'owner', A.new_owner, 'renewals', 0)
return 1
