-- Fold a job's duration into the model's moving average, read and written in one step: two workers ending
-- jobs at once cannot both start from the same old value and lose an update.
-- KEYS: average
-- ARGV: value weight at
local old = redis.call('HGET', K.average, 'value')
local value = tonumber(A.value)
if old then value = (1 - tonumber(A.weight)) * tonumber(old) + tonumber(A.weight) * value end
redis.call('HSET', K.average, 'value', tostring(value), 'at', A.at)
return 1
