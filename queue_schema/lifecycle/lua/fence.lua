-- The log's side of a lease take when the log lives on the events store (INFERQ_EVENTS_URL): the take's
-- fence entry, written after the queue's Redis counted the take's generation (LOG.take with `apart`). Answers
-- {next seq, state}: state 1 fenced in, 0 the log was closed, -1 a later take fenced it first (this take is
-- stale: nothing to run). A job's first take may find no log yet (the API writes `queued` after admission):
-- it writes that event itself, from RQ's job hash, so the log has it whichever comes first.
-- KEYS: log
-- ARGV: gen owner queued ttl
-- USES: log
local gen = tonumber(A.gen)
local next_seq, closed, top = LOG.tail(K.log)
if closed then return {next_seq, 0} end
if top >= gen then return {next_seq, -1} end
if next_seq == 0 and A.queued ~= '' then
  redis.call('XADD', K.log, '1-0', 't', 'queued', 'e', A.queued)
  next_seq = 1
end
if next_seq == 0 then
  redis.call('XADD', K.log, gen .. '-0', 'f', A.owner)
  next_seq = 1
else
  redis.call('XADD', K.log, gen .. '-' .. (next_seq - 1), 'f', A.owner)
end
redis.call('EXPIRE', K.log, A.ttl)
return {next_seq, 1}
