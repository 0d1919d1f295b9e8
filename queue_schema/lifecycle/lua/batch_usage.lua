-- A tenant's batch quota use, for /metrics: {batches in flight, bytes of batch results and outputs}.
-- KEYS: open files
-- ARGV: final
-- USES: keys quota
local open, held = QUOTA.batch_use(K.open, K.files, A.final)
return {open, held}
