-- Narration for operators: kept in a capped stream (late watchers) and published live, without a seq.
-- KEYS: log channel
-- ARGV: event maxlen
redis.call('XADD', K.log, 'MAXLEN', '~', A.maxlen, '*', 'e', A.event)
redis.call('PUBLISH', K.channel, '- narration ' .. A.event)
return 1
