-- A decode step's events for any number of jobs, each written by the take that holds it, in one call: per
-- event an XADD at the take's generation, which Redis itself refuses once a later take fenced the log
-- (log.lua), and a PUBLISH of what was written (a refused event must not reach a live stream). No read
-- per event: the log is looked at only when Redis refused one, to say why. Per job: 1 written (an event
-- already logged, a batch retried after a lost reply, counts as written), 0 the log was closed or is gone,
-- -1 fenced. Terminal events do not come here (append.lua closes a log).
-- KEYS:
-- ARGV: ttl pub
-- USES: log
-- Then, per job, KEYS: its stream, channel; ARGV: its generation, n, refresh ("1": renew the log's TTL),
-- then n times (seq, type, json).
LOG.pub = A.pub
local out = {}
local a = A_REST
for k = K_REST, #KEYS, 2 do
  local stream, channel = KEYS[k], KEYS[k + 1]
  local gen, n, refresh = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2] == '1'
  local first = a + 3
  a = first + 3 * n
  local status = 1
  for i = first, first + 3 * (n - 1), 3 do
    local seq, kind, json = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local id = redis.pcall('XADD', stream, 'NOMKSTREAM', gen .. '-' .. seq, 't', kind, 'e', json)
    if id == false then  -- NOMKSTREAM: the log expired, or was never there
      status = 0
      break
    elseif type(id) == 'table' and id.err then
      -- Only a refused id is an answer here; anything else (out of memory, a read-only replica) is the
      -- caller's to retry, as an error.
      if not string.find(id.err, 'equal or smaller', 1, true) then return redis.error_reply(id.err) end
      local _, closed, top = LOG.tail(stream)
      if closed then status = 0 break end
      if top > gen then status = -1 break end
      -- else: already logged by this take
    else
      LOG.publish(channel, seq, kind, json)
    end
  end
  if status == 1 and refresh then redis.call('EXPIRE', stream, A.ttl) end
  out[#out + 1] = status
end
return out
