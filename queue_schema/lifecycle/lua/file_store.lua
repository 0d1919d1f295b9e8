-- Keep a file (api/file_store.py): its metadata hash and its pieces, with a TTL, unless its tenant's files
-- would pass `cap` bytes ({0, used}); {1, used} kept. Index entries of files gone are dropped on the way.
-- KEYS: file files pieces
-- ARGV: id created ttl cap size nfields
-- USES: keys
-- Then ARGV: the hash's field/value pairs (nfields values), then the pieces (none: a Writer pushed them).
local used = 0
for _, id in ipairs(redis.call('ZRANGE', K.files, 0, -1)) do
  local size = redis.call('HGET', KEY.file(id), 'bytes')
  if size then used = used + tonumber(size) else redis.call('ZREM', K.files, id) end
end
local size, cap = tonumber(A.size), tonumber(A.cap)
if cap > 0 and used + size > cap then return {0, used} end
local last = A_REST + tonumber(A.nfields) - 1
local fields = {}
for i = A_REST, last do fields[#fields + 1] = ARGV[i] end
redis.call('DEL', K.file)
if #ARGV > last then redis.call('DEL', K.pieces) end
redis.call('HSET', K.file, unpack(fields))
for i = last + 1, #ARGV do redis.call('RPUSH', K.pieces, ARGV[i]) end
for _, key in ipairs({K.file, K.pieces}) do redis.call('EXPIRE', key, A.ttl) end
redis.call('ZADD', K.files, A.created, A.id)
redis.call('EXPIRE', K.files, A.ttl)
return {1, used + size}
