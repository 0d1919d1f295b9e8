-- The checked append: events of writers that a step's append (step.lua) does not serve,
-- the unowned writer "" (the API, writing jobs nobody holds) and every batch with a terminal event. Per
-- job: 1 written, 0 the log was closed, -1 fenced (the writer does not hold the lease), -2 the first new
-- seq would leave a gap; a seq already logged is skipped (a batch retried after a lost reply). A terminal
-- event closes the log and puts the job on the settling set: what hangs on a job's end is settled next
-- (settle.lua), by whoever wrote it or, failing that, the reaper.
-- A take's writer is "<worker>#<generation>" and writes at that generation. The unowned writer takes a
-- generation of its own from the job's counter, so its write fences every take before it as a take does
-- (log.lua); a take after it counts on from there. So does every terminal event: nothing of any take, its
-- own writer's included, can follow it into the log.
-- With `apart` ("1": the log lives on the events store, INFERQ_EVENTS_URL) this runs there and touches only
-- the log: the lease is not read (a take's generation is its fence, and the callers of the unowned writer
-- took the job out of every queue first), a new generation is the log's own next one, and the caller put the
-- job on the settling set before (queue_schema.lifecycle.eventlog).
-- KEYS: settling
-- ARGV: ttl now apart pub
-- USES: log keys
-- Then, per job, KEYS: its stream, channel, lease (not where apart); ARGV: its id, writer, n, then n times
-- (seq, type, json, final state or "" for an event that is not terminal).
-- A generation no take has had, above the log's (the job's counter moved on; without a job record
-- nothing takes the job again, and the log's own is enough).
local apart = A.apart == '1'
LOG.pub = A.pub
local function next_gen(job, top_gen)
  if apart then return top_gen + 1 end
  local rq_job = KEY.rq_job(job)
  if redis.call('EXISTS', rq_job) == 1 then return LOG.next_gen(rq_job, top_gen) end
  return top_gen + 1
end

local out = {}
local a = A_REST
for k = K_REST, #KEYS, apart and 2 or 3 do
  local stream, channel, lease = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local job, writer, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local first = a + 3
  a = first + 4 * n
  local status, gen = 1, nil
  local next_seq, closed, top_gen = LOG.tail(stream)
  if not apart and (redis.call('HGET', lease, 'owner') or '') ~= writer then
    status = -1
  elseif closed then
    -- A batch retried after a lost reply finds the log closed by its own terminal: written, then.
    status = tonumber(ARGV[first + 4 * (n - 1)]) < next_seq and writer ~= '' and 1 or 0
  elseif writer == '' then
    gen = next_gen(job, top_gen)
  else
    gen = tonumber(string.match(writer, '#(%d+)$')) or 0
    if gen < top_gen then status = -1 end
  end
  if status == 1 then
    for i = first, first + 4 * (n - 1), 4 do
      local seq = tonumber(ARGV[i])
      if seq > next_seq then status = -2 break end
      if seq == next_seq then
        local terminal = ARGV[i + 3] ~= ''
        if terminal and writer ~= '' then gen = next_gen(job, gen) end
        LOG.write(stream, channel, gen, seq, ARGV[i + 1], ARGV[i + 2], terminal)
        next_seq = seq + 1
        if terminal then
          if not apart then redis.call('ZADD', K.settling, A.now, job) end
          break
        end
      end
    end
    redis.call('EXPIRE', stream, A.ttl)
  end
  out[#out + 1] = status
end
return out
