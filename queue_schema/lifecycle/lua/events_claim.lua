-- A process joins the users of the job logs' store it names (ARGV identity, "" for the queue's own Redis).
-- Returns {0} when it may use it (the fleet's store, or a switch to it); a refusal:
-- {1, fleet's store, a user of another store} or {2, fleet's store, open jobs}.
-- KEYS: store users open_jobs
-- ARGV: identity process now_ms ttl_ms
redis.call('ZREMRANGEBYSCORE', K.users, '-inf', '(' .. (tonumber(A.now_ms) - tonumber(A.ttl_ms)))
-- No claim yet means the queue's own Redis: where every log lived before processes claimed one.
local store = redis.call('GET', K.store) or ''
if store ~= A.identity then
  for _, user in ipairs(redis.call('ZRANGE', K.users, 0, -1)) do
    if string.sub(user, 1, #A.identity + 1) ~= A.identity .. '\t' then return {1, store, user} end
  end
  local open = redis.call('ZCARD', K.open_jobs)
  if open > 0 then return {2, store, open} end
end
redis.call('SET', K.store, A.identity)
redis.call('ZADD', K.users, A.now_ms, A.identity .. '\t' .. A.process)
return {0}
