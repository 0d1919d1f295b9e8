-- The event log's conventions, the one place they are written (queue_schema/lifecycle/eventlog.py):
-- a job's log is a Redis Stream whose entry id is "<generation>-<seq>": the generation of the lease take that
-- wrote it, then the event's seq. Redis refuses an XADD whose id is not above the stream's last, so once a
-- take has written (or been fenced in, LOG.take) no earlier take can write again: the fence costs no read.
-- An event's entry holds its type in "t" and its JSON in "e"; the one terminal entry also carries "closed",
-- after which nothing is written. A fence entry holds "f" (the take's owner) and no event. What is written
-- is published on the job's channel, for the API's live relay; what is refused is not.
-- Seqs grow by one along the log across takes; a fence repeats the seq of the event before it.
-- Where the logs live on a store of their own (INFERQ_EVENTS_URL), the scripts of the queue's Redis only count
-- generations (LOG.take with `apart`), and the log's side of a take is fence.lua there; on an events cluster
-- the live message goes by sharded pub/sub (LOG.pub = 'SPUBLISH', set by the scripts that write logs).
local LOG = {pub = 'PUBLISH'}

local function has(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return true end
  end
  return false
end

local function id_parts(id)
  local gen, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(gen), tonumber(seq)
end

-- The seq the next event takes, whether the log is closed, and the generation of its last entry.
function LOG.tail(stream)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if not last then return 0, false, 0 end
  local gen, seq = id_parts(last[1])
  return seq + 1, has(last[2], 'closed'), gen
end

-- The live message is "<seq> <type> <json>": the relay learns seq and type without parsing the JSON.
function LOG.publish(channel, seq, kind, json)
  redis.call(LOG.pub, channel, seq .. ' ' .. kind .. ' ' .. json)
end

function LOG.write(stream, channel, gen, seq, kind, json, terminal)
  if terminal then
    redis.call('XADD', stream, gen .. '-' .. seq, 't', kind, 'e', json, 'closed', '1')
  else
    redis.call('XADD', stream, gen .. '-' .. seq, 't', kind, 'e', json)
  end
  LOG.publish(channel, seq, kind, json)
end

-- A generation above `top` (the log's last), from the job's counter (kept in RQ's job hash, `lease_gen`),
-- moved on: a log written before its job hash was (a job enqueued around the API) is still passed.
function LOG.next_gen(rq_job, top)
  local gen = redis.call('HINCRBY', rq_job, 'lease_gen', 1)
  if gen <= top then
    gen = top + 1
    redis.call('HSET', rq_job, 'lease_gen', gen)
  end
  return gen
end

-- A take of the job by `taker`: a new generation, and a fence entry at it that sorts after anything the
-- takes before could still write, so Redis refuses their next XADD (a closed log needs none: it refuses
-- everything). Answers the lease owner string ("<taker>#<generation>"), the seq the take writes next, and
-- whether the log is closed. A job with no log yet gets one here: its fence takes seq 0, its events start at 1.
-- A caller that has just read the log's end (LOG.tail) passes it on, `tail` = {next_seq, closed, top}.
-- `apart`: the log is on the events store, where the caller fences it next (fence.lua); here only the
-- generation is counted, and the next seq (-1) and closedness are the fence's to say.
function LOG.take(stream, rq_job, taker, tail, apart)
  if apart then return taker .. '#' .. LOG.next_gen(rq_job, 0), -1, false end
  local next_seq, closed, top
  if tail then next_seq, closed, top = tail[1], tail[2], tail[3] else next_seq, closed, top = LOG.tail(stream) end
  local gen = LOG.next_gen(rq_job, top)
  local owner = taker .. '#' .. gen
  if closed then return owner, next_seq, true end
  if next_seq == 0 then
    redis.call('XADD', stream, gen .. '-0', 'f', owner)
    return owner, 1, false
  end
  redis.call('XADD', stream, gen .. '-' .. (next_seq - 1), 'f', owner)
  return owner, next_seq, false
end

-- Up to `count` entries after the event `after` (a seq; -1 for the whole log), fences included. Entries are
-- ordered by (generation, seq), so the first with a seq past `after` is in the first generation that has one.
function LOG.after(stream, after, count)
  if after < 0 then return redis.call('XRANGE', stream, '-', '+', 'COUNT', count) end
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  if not first then return {} end
  local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  local low, high = id_parts(first[1]), id_parts(top[1])
  for gen = low, high do
    local hit = redis.call('XRANGE', stream, gen .. '-' .. (after + 1), gen .. '-18446744073709551615', 'COUNT', 1)[1]
    if hit then return redis.call('XRANGE', stream, hit[1], '+', 'COUNT', count) end
  end
  return {}
end
