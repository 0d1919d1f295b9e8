-- Up to `count` entries of a job's log after the event with seq `after` (fences included: the reader skips
-- them), for a replay from a client's Last-Event-ID: the log's ids lead with the generation, so a seq alone
-- does not name a place in it (log.lua).
-- KEYS: log
-- ARGV: after count
-- USES: log
return LOG.after(K.log, tonumber(A.after), tonumber(A.count))
