-- The event log's conventions, the one place they are written (queue_schema/lifecycle/eventlog.py):
-- a job's log is a Redis Stream whose entry id is "<seq>-1" (Redis itself keeps seqs unique, and a replay
-- from a seq is a plain XRANGE), the event's JSON in field "e"; the one terminal entry also carries a
-- field "closed", after which nothing is written; the live channel carries "<seq> <type> <json>".
local LOG = {}

-- The seq the next event takes, and whether the log is closed.
function LOG.tail(stream)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if not last then return 0, false end
  return tonumber(string.match(last[1], '^(%d+)')) + 1, #last[2] > 2
end

-- The seq the next event takes, from the entry count: seqs start at 0 and a job's log is never trimmed, so
-- the count is the next seq. Cheaper than LOG.tail, which brings back the last event's JSON; it says
-- nothing of the closed mark, which only the writer that holds the lease could have written.
function LOG.next_seq(stream)
  return redis.call('XLEN', stream)
end

-- Whether a log that may be gone (expired) is closed, or gone.
function LOG.closed_or_gone(stream)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  return (not last) or #last[2] > 2
end

function LOG.write(stream, channel, seq, kind, json, terminal)
  if terminal then
    redis.call('XADD', stream, seq .. '-1', 'e', json, 'closed', '1')
  else
    redis.call('XADD', stream, seq .. '-1', 'e', json)
  end
  redis.call('PUBLISH', channel, seq .. ' ' .. kind .. ' ' .. json)
end
