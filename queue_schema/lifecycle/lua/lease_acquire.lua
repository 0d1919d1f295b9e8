-- Take up to `want` jobs under `owner`'s lease, highest priority first: each job leaves its queue and gains
-- its lease in this one step, so no instant finds it in no queue and under no lease. Within a priority the
-- tenants' queues take turns (fair share): the ring's head moves to its tail and gives one job; a queue
-- that runs empty leaves the ring. The job moves from its limit key's queued set to its running set. A job
-- whose log already ended (cancelled as it was taken) comes back closed and unleased.
-- The lease's owner is "<owner>#<generation>": the generation counts the times the job was taken (kept in
-- RQ's job hash, which lives as long as the job), so every take writes as a writer of its own, and its
-- fence in the log (log.lua) shuts out the takes before it.
-- Answers {id, queue, next seq, closed (0/1), the lease owner ("" if closed), RQ's job hash as field/value
-- pairs} per job. With `apart` ("1": the log is on the events store) the log is not read here: the next seq
-- is -1 and closed 0, and the caller fences the log next (fence.lua) to learn both.
-- KEYS: leases
-- ARGV: owner worker now_ms now_rq want apart
-- USES: log keys
-- Then, per priority (highest first), KEYS: its ring, the model's own queue.
local want = tonumber(A.want)
local out = {}
local function take(id, queue)
  local job = KEY.rq_job(id)
  if redis.call('HGET', job, 'status') ~= 'queued' then return end
  local stream = KEY.job_events(id)
  local apart = A.apart == '1'
  local next_seq, closed, top = -1, false, 0
  if not apart then next_seq, closed, top = LOG.tail(stream) end
  local owner = ''
  if not closed then
    owner, next_seq = LOG.take(stream, job, A.owner, {next_seq, closed, top}, apart)
    redis.call('HSET', KEY.job_lease(id), 'owner', owner, 'renewals', 0, 'taken_ms', A.now_ms)
    redis.call('ZADD', K.leases, A.now_ms, id)
    redis.call('HSET', job, 'status', 'started', 'worker_name', A.worker, 'started_at', A.now_rq,
               'last_heartbeat', A.now_rq)
    redis.call('PERSIST', job)
    local limit = redis.call('HGET', KEY.job_info(id), 'limit')
    if limit then
      redis.call('SREM', KEY.limit_queued(limit), id)
      redis.call('SADD', KEY.limit_running(limit), id)
    end
  end
  out[#out + 1] = {id, queue, next_seq, closed and 1 or 0, owner, redis.call('HGETALL', job)}
end
for k = K_REST, #KEYS, 2 do
  local ring, own = KEYS[k], KEYS[k + 1]
  while #out < want do
    local member = redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
    if not member then break end
    local queue = KEY.rq_queue(member)
    local id = redis.call('LPOP', queue)
    if not id or redis.call('LLEN', queue) == 0 then redis.call('LREM', ring, -1, member) end
    if id then take(id, queue) end
  end
  -- Jobs pushed on the model's own queue some other way (RQ's API) are in no ring.
  while #out < want do
    local id = redis.call('LPOP', own)
    if not id then break end
    take(id, own)
  end
  if #out >= want then break end
end
return out
