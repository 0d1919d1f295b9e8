"""Files for OpenAI's Files API: batch inputs uploaded by tenants, and batch outputs.

The bytes live in Redis, beside the file's metadata in one hash per file,
with a TTL (``INFERQ_FILE_TTL_S``, 7 days by default) and size caps (per
file, and per tenant in all). Redis because it is the one store every API
host shares: with several API hosts behind a load balancer, a file uploaded
through one must be readable through any, and a batch is advanced by
whichever process claims it. A directory would need a shared filesystem.
The cost is Redis memory, which the caps and the TTL bound; a batch's
output counts towards its tenant's bytes but is never refused for them (the
work is done).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis

from queue_schema import keys

INPUT, OUTPUT = "batch", "batch_output"  # the purposes: what a client uploads, what a batch writes

# KEYS: the file's hash, the tenant's file index. ARGV: file id, created (ms), ttl (s), cap (bytes; 0: none),
# the hash prefix, then the hash's field/value pairs, "bytes" first.
_STORE = """
local used = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local size = redis.call('HGET', ARGV[5] .. id, 'bytes')
  if size then used = used + tonumber(size) else redis.call('ZREM', KEYS[2], id) end
end
local size = tonumber(ARGV[7])
local cap = tonumber(ARGV[4])
if cap > 0 and used + size > cap then return {0, used} end
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return {1, used + size}
"""


@dataclass(frozen=True)
class FileInfo:
    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    created_at: int  # s
    expires_at: int  # s

    def to_dict(self) -> dict:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": self.expires_at, "status_details": None}


class QuotaExceeded(Exception):
    def __init__(self, used: int):
        super().__init__(f"{used} bytes in use")
        self.used = used


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


def store(client: redis.Redis, tenant: str, purpose: str, filename: str, content: bytes, now_ms: int,
          ttl_s: int, tenant_cap: int = 0, file_id: str | None = None) -> FileInfo:
    """Keep ``content``; QuotaExceeded if the tenant's files would pass ``tenant_cap`` bytes."""
    file_id = file_id or new_file_id()
    info = FileInfo(file_id, tenant, purpose, filename, len(content), now_ms // 1000, now_ms // 1000 + ttl_s)
    fields = {"bytes": info.bytes, "id": file_id, "tenant": tenant, "purpose": purpose, "filename": filename,
              "created_at": info.created_at, "expires_at": info.expires_at, "content": content}
    flat = [v for kv in fields.items() for v in kv]
    ok, used = client.eval(_STORE, 2, keys.file(file_id), keys.tenant_files(tenant), file_id, now_ms, ttl_s,
                           tenant_cap, keys.file(""), *flat)
    if not ok:
        raise QuotaExceeded(int(used))
    return info


_FIELDS = ("id", "tenant", "purpose", "filename", "bytes", "created_at", "expires_at")


def _decode(raw: list[bytes | None]) -> FileInfo | None:
    if raw[0] is None:
        return None
    fid, tenant, purpose, filename, size, created, expires = (v.decode() for v in raw)
    return FileInfo(fid, tenant, purpose, filename, int(size), int(created), int(expires))


def get(client: redis.Redis, file_id: str) -> FileInfo | None:
    return _decode(client.hmget(keys.file(file_id), *_FIELDS))


def listing(client: redis.Redis, tenant: str, limit: int, after: str | None) -> tuple[list[FileInfo], bool] | None:
    """The tenant's files, newest first, after the file ``after`` (OpenAI's cursor: an id); None when
    ``after`` names no file of the tenant's. By rank, not by upload time: two files uploaded in the same
    millisecond are both listed."""
    index = keys.tenant_files(tenant)
    start = 0
    if after:
        rank = client.zrevrank(index, after)
        if rank is None:
            return None
        start = rank + 1
    ids = client.zrevrange(index, start, start + limit)  # one more than asked: is there more?
    pipe = client.pipeline(transaction=False)
    for file_id in ids[:limit]:
        pipe.hmget(keys.file(file_id.decode()), *_FIELDS)
    found = [f for f in map(_decode, pipe.execute()) if f is not None]
    return found, len(ids) > limit


def content(client: redis.Redis, file_id: str) -> bytes | None:
    return client.hget(keys.file(file_id), "content")


def delete(client: redis.Redis, info: FileInfo) -> None:
    pipe = client.pipeline()
    pipe.delete(keys.file(info.id))
    pipe.zrem(keys.tenant_files(info.tenant), info.id)
    pipe.execute()
