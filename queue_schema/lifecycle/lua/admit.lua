-- Admission (queue_schema/lifecycle/admission.py): the job an Idempotency-Key already gave, or, in one step
-- nothing can interleave with, every check and then the job: a worker serves the model and has what the job
-- needs, the tenant's limits (a token bucket of submits, its queued and running jobs), the queue bound; then
-- RQ's job hash, the job on its tenant's queue (and the queue on its ring), its info hash, its `queued`
-- event with its position and ETA, its places in the job indexes, the counters, and a wake-up for the
-- model's idle workers.
-- Answers {1, position, eta} admitted, {2, job id} replayed; refusals {-1} no such model, {-8, capability,
-- backend} unsupported feature, {-3} offline, {-4, wait ms} rate, {-5, n} queued, {-6, n} running,
-- {-2, bound} queue full, {-7, job id} idempotency key reused. With `apart` ("1": the log lives on the events
-- store) the event is not written here but kept in RQ's job hash (`queued_event`) and answered as a fourth
-- element: the API writes it there next, or the job's first take does if it comes first (fence.lua).
-- KEYS: model job events channel open_jobs rq_queues counters wake serving eta info queue ring queued running
-- KEYS: bucket idem tenant_jobs all_jobs tenant_counters tenants
-- ARGV: now bound priority id ttl event worker_ttl model queue_name tenant limit_key rate burst max_queued
-- ARGV: max_running idem idem_ttl horizon webhook batch needs listed apart
-- USES: log keys
-- Then KEYS: the rings of the interactive priorities, in order; ARGV: the job hash's field/value pairs.
local now, id, idem = tonumber(A.now), A.id, A.idem
if idem ~= '' then
  local prior = redis.call('GET', K.idem)
  if prior then
    local cut = string.find(prior, ' ', 1, true)
    local mine = string.sub(idem, string.find(idem, ' ', 1, true) + 1)
    if string.sub(prior, cut + 1) ~= mine then return {-7, string.sub(prior, 1, cut - 1)} end
    return {2, string.sub(prior, 1, cut - 1)}
  end
end
local model = redis.call('GET', K.model)
if not model then return {-1} end
local info = cjson.decode(model)
local needs = cjson.decode(A.needs)
if #needs > 0 then
  local have = {}
  if type(info['capabilities']) == 'table' then
    for _, c in ipairs(info['capabilities']) do have[c] = true end
  end
  for _, c in ipairs(needs) do
    if not have[c] then return {-8, c, info['backend'] or ''} end
  end
end
local serving = redis.call('ZCOUNT', K.serving, now / 1000 - tonumber(A.worker_ttl), '+inf')
if serving == 0 then return {-3} end
local rate, tokens = tonumber(A.rate), 0
if rate > 0 then
  local burst = tonumber(A.burst)
  local bucket = redis.call('HMGET', K.bucket, 'tokens', 'at')
  tokens = tonumber(bucket[1]) or burst
  tokens = math.min(burst, tokens + math.max(0, now - (tonumber(bucket[2]) or now)) * rate / 1000)
  if tokens < 1 then return {-4, math.ceil((1 - tokens) * 1000 / rate)} end
end
local max_queued, max_running = tonumber(A.max_queued), tonumber(A.max_running)
if max_queued > 0 and redis.call('SCARD', K.queued) >= max_queued then return {-5, max_queued} end
if max_running > 0 and redis.call('SCARD', K.running) >= max_running then return {-6, max_running} end
local prio, member = tonumber(A.priority), A.queue_name
local own = redis.call('LLEN', K.queue)
-- Waiting jobs per interactive priority, and of the other tenants' queues in the job's own ring.
local depth, ahead, others = 0, 0, 0
local function ring(key, mine)
  local total = 0
  for _, m in ipairs(redis.call('LRANGE', key, 0, -1)) do
    local n = redis.call('LLEN', KEY.rq_queue(m))
    total = total + n
    if mine and m ~= member then others = others + math.min(n, own + 1) end
  end
  return total
end
local interactive = #KEYS - K_REST + 1
for q = K_REST, #KEYS do
  local p = q - K_REST + 1
  local n = ring(KEYS[q], p == prio)
  depth = depth + n
  if p < prio then ahead = ahead + n end
end
if prio > interactive then
  ahead = depth
  ring(K.ring, true)
else
  local bound = math.min(tonumber(info['queue_depth']), tonumber(A.bound))
  if depth >= bound then return {-2, bound} end
end
local position = ahead + own + others
local eta = 'null'
local per_job = redis.call('HGET', K.eta, 'value')
if per_job then
  local slots = tonumber(info['slots'] or 1)
  eta = string.format('%.3f', (position + 1) * tonumber(per_job) / (serving * slots))
end
local fields = {}
for i = A_REST, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', K.job, unpack(fields))
-- The queued event is generation 1 (a stream id must be above 0-0); takes count on from there.
redis.call('HSET', K.job, 'lease_gen', 1)
if redis.call('RPUSH', K.queue, id) == 1 then
  redis.call('LREM', K.ring, 0, member)
  redis.call('RPUSH', K.ring, member)
end
redis.call('SADD', K.rq_queues, K.queue)
local tenant, limit_key = A.tenant, A.limit_key
redis.call('HSET', K.info, 'tenant', tenant, 'limit', limit_key, 'submitted', now, 'model', A.model)
if A.webhook ~= '' then redis.call('HSET', K.info, 'webhook', A.webhook) end
if A.batch ~= '' then redis.call('HSET', K.info, 'batch', A.batch) end
redis.call('SADD', K.queued, id)
if rate > 0 then
  redis.call('HSET', K.bucket, 'tokens', tostring(tokens - 1), 'at', now)
  redis.call('PEXPIRE', K.bucket, math.ceil(tonumber(A.burst) * 1000 / rate) + 1000)
end
local horizon, listed = tonumber(A.horizon), A.listed
for _, index in ipairs({K.tenant_jobs, K.all_jobs}) do
  redis.call('ZADD', index, listed, id)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', string.format('%.0f', tonumber(listed) - horizon * 1000))
  redis.call('PEXPIRE', index, horizon)
end
redis.call('HINCRBY', K.tenant_counters, 'submitted|' .. tenant, 1)
redis.call('HSET', K.tenants, limit_key, tenant)
if idem ~= '' then redis.call('SET', K.idem, idem, 'EX', A.idem_ttl) end
local event = string.gsub((string.gsub(A.event, '"@@position@@"', position)), '"@@eta@@"', eta)
if A.apart == '1' then
  redis.call('HSET', K.job, 'queued_event', event)
else
  LOG.write(K.events, K.channel, 1, 0, 'queued', event, false)
  redis.call('EXPIRE', K.events, A.ttl)
end
redis.call('ZADD', K.open_jobs, now, id)
redis.call('HINCRBY', K.counters, 'submitted|' .. A.model, 1)
redis.call('RPUSH', K.wake, 1)
redis.call('LTRIM', K.wake, -64, -1)
return {1, position, eta, event}
