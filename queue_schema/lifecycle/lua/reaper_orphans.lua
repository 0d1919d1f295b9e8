-- Of the open jobs given, those with no lease: {id, RQ's status or "missing"} each.
-- USES: keys
-- Then ARGV: the job ids.
local out = {}
for i = A_REST, #ARGV do
  local id = ARGV[i]
  if redis.call('EXISTS', KEY.job_lease(id)) == 0 then
    out[#out + 1] = {id, redis.call('HGET', KEY.rq_job(id), 'status') or 'missing'}
  end
end
return out
