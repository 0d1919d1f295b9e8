-- A step's events for any number of jobs, in one call, each job's fenced by its lease: the writer must own
-- it (the unowned writer "", the API, writes jobs nobody holds). Per job: 1 written, 0 the log was closed,
-- -1 fenced, -2 the first new seq would leave a gap; a seq already logged is skipped (a batch retried after
-- a lost reply). A terminal event closes the log and puts the job on the settling set: what hangs on a
-- job's end is settled next (settle.lua), by whoever wrote it or, failing that, the reaper.
-- This runs once per decode step for every job in it, so each call inside counts (bench.redis_cost): the
-- owner's next seq comes from the entry count, not the last entry (whose close mark only the owner itself
-- could have written), and the TTL is renewed only when the writer asks (its first write, then now and
-- then, and every terminal event), not at every step.
-- Each job names its writer: the lease owner it wrote as, "<worker>#<generation>", whose generation grows each
-- time the job is taken (lease_acquire.lua), so a copy of a job that its own worker lost and took again is
-- fenced like any other writer.
-- KEYS: settling
-- ARGV: ttl now
-- USES: log
-- Then, per job, KEYS: its stream, channel, lease; ARGV: its id, writer, n, refresh ("1": renew the log's TTL),
-- then n times (seq, type, json, final state or "" for an event that is not terminal).
local out = {}
local a = A_REST
for k = K_REST, #KEYS, 3 do
  local stream, channel, lease = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local job, writer, n, refresh = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3] == '1'
  local first = a + 4
  a = first + 4 * n
  local status, next_seq, closed = 1, 0, false
  if (redis.call('HGET', lease, 'owner') or '') ~= writer then
    status = -1
  elseif writer ~= '' then
    next_seq = LOG.next_seq(stream)
  else
    next_seq, closed = LOG.tail(stream)
    if closed then status = 0 end
  end
  if status == 1 then
    for i = first, first + 4 * (n - 1), 4 do
      local seq = tonumber(ARGV[i])
      if seq > next_seq then status = -2 break end
      if seq == next_seq then
        local terminal = ARGV[i + 3] ~= ''
        LOG.write(stream, channel, seq, ARGV[i + 1], ARGV[i + 2], terminal)
        next_seq = seq + 1
        if terminal then
          redis.call('ZADD', K.settling, A.now, job)
          refresh = true
          break
        end
      end
    end
    if refresh then redis.call('EXPIRE', stream, A.ttl) end
  end
  out[#out + 1] = status
end
return out
