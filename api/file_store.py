"""Files for OpenAI's Files API: batch inputs uploaded by tenants, and batch outputs.

The bytes live in Redis, in pieces (``keys.file_content``, a list of pieces of
at most ``PIECE_BYTES``) beside the file's metadata (``keys.file``), with a TTL
(``INFERQ_FILE_TTL_S``, 7 days by default) and size caps (per file, and per
tenant in all). Redis because it is the one store every API host shares: with
several API hosts behind a load balancer, a file uploaded through one must be
readable through any, and a batch is advanced by whichever process claims it.
A directory would need a shared filesystem. The cost is Redis memory, which the
caps and the TTL bound. Pieces because a batch's output is written as its
results are turned into lines, and a download is sent as it is read: neither
holds a whole file in one string, nor sends one 8 MiB command to Redis. A batch's
output counts towards its tenant's bytes but is never refused for them (the work
is done); batch results and outputs have a bound of their own
(api.batch_store).
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from api import pages
from queue_schema import keys
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle import scripts

INPUT, OUTPUT = "batch", "batch_output"  # the purposes: what a client uploads, what a batch writes
PIECE_BYTES = 1 << 20

_STORE = scripts.load("file_store")


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


class QuotaExceeded(InferqError):
    def __init__(self, used: int):
        super().__init__(ErrorCode.FILE_TOO_LARGE, f"{used} bytes in use")
        self.used = used


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


def store(client: redis.Redis, tenant: str, purpose: str, filename: str, content: bytes, now_ms: int,
          ttl_s: int, tenant_cap: int = 0, file_id: str | None = None) -> FileInfo:
    """Keep ``content``; QuotaExceeded if the tenant's files would pass ``tenant_cap`` bytes."""
    pieces = [content[i:i + PIECE_BYTES] for i in range(0, len(content), PIECE_BYTES)] or [b""]
    return _commit(client, tenant, purpose, filename, pieces, len(content), now_ms, ttl_s, tenant_cap,
                   file_id or new_file_id())


def _commit(client, tenant, purpose, filename, pieces, size, now_ms, ttl_s, tenant_cap, file_id) -> FileInfo:
    info = FileInfo(file_id, tenant, purpose, filename, size, now_ms // 1000, now_ms // 1000 + ttl_s)
    fields = {"bytes": info.bytes, "id": file_id, "tenant": tenant, "purpose": purpose, "filename": filename,
              "created_at": info.created_at, "expires_at": info.expires_at}
    flat = [v for kv in fields.items() for v in kv]
    ok, used = _STORE(client, {"file": keys.file(file_id), "files": keys.tenant_files(tenant),
                               "pieces": keys.file_content(file_id)},
                      {"id": file_id, "created": now_ms, "ttl": ttl_s, "cap": tenant_cap, "size": size,
                       "nfields": len(flat)}, more_args=[*flat, *pieces])
    if not ok:
        raise QuotaExceeded(int(used))
    return info


class Writer:
    """A file written a piece at a time (a batch's output), made visible at ``close`` (never refused)."""

    def __init__(self, client: redis.Redis, file_id: str):
        self.redis, self.file_id = client, file_id
        self.size = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._started = False

    def write(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered >= PIECE_BYTES:
            self._flush()

    def _flush(self) -> None:
        piece = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        pipe = self.redis.pipeline(transaction=False)
        if not self._started:  # written again after a crash: start over
            pipe.delete(keys.file_content(self.file_id))
            self._started = True
        pipe.rpush(keys.file_content(self.file_id), piece)
        pipe.execute()

    def close(self, tenant: str, purpose: str, filename: str, now_ms: int, ttl_s: int) -> FileInfo:
        """The last piece goes with the file's metadata, in one script."""
        if not self._started:  # small enough for one piece: nothing written yet
            return store(self.redis, tenant, purpose, filename, b"".join(self._buffer), now_ms, ttl_s,
                         file_id=self.file_id)
        if self._buffer:
            self._flush()
        return _commit(self.redis, tenant, purpose, filename, [], self.size, now_ms, ttl_s, 0, self.file_id)


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
    ``after`` names no file of the tenant's."""
    ids = pages.ids_after(client, keys.tenant_files(tenant), after, limit)
    if ids is None:
        return None
    pipe = client.pipeline(transaction=False)
    for file_id in ids[:limit]:
        pipe.hmget(keys.file(file_id), *_FIELDS)
    found = [f for f in map(_decode, pipe.execute()) if f is not None]
    return found, len(ids) > limit


def pieces(client: redis.Redis, file_id: str) -> Iterator[bytes]:
    """The file's bytes, a piece at a time (one read each)."""
    for index in range(client.llen(keys.file_content(file_id))):
        piece = client.lindex(keys.file_content(file_id), index)
        if piece is None:  # expired or deleted while it was read
            return
        yield piece
    legacy = client.hget(keys.file(file_id), "content")  # a file stored whole, before pieces
    if legacy is not None:
        yield legacy


def content(client: redis.Redis, file_id: str) -> bytes | None:
    """The whole file (a batch's input: at most the upload cap), or None if it is gone."""
    if not client.exists(keys.file(file_id)):
        return None
    return b"".join(pieces(client, file_id))


def delete(client: redis.Redis, info: FileInfo) -> None:
    pipe = client.pipeline()
    pipe.delete(keys.file(info.id), keys.file_content(info.id))
    pipe.zrem(keys.tenant_files(info.tenant), info.id)
    pipe.execute()
