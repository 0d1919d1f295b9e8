"""OpenAI's Files API, for batch input: upload, look up, read, delete; each tenant sees its own.

Limits (clear errors, before anything is stored): a file is at most
``INFERQ_FILE_MAX_BYTES`` (8 MiB; 413 ``file_too_large``) and
``INFERQ_FILE_MAX_LINES`` non-empty lines (10,000; 400), with purpose
``batch`` (whether it is UTF-8 JSONL of requests is checked when a batch reads it); a
tenant's files take at most ``INFERQ_FILES_MAX_BYTES_PER_TENANT``
(64 MiB; 413) and expire after ``INFERQ_FILE_TTL_S`` (7 days). Where the bytes
live and why: api/file_store.py.
"""
from __future__ import annotations

import io
import logging

from flask import Blueprint, current_app, jsonify, request, send_file

from api import auth, memory
from api import file_store as files
from api.extensions import now_ms, resources
from api.openai import errors
from api.pages import cursor_page
from queue_schema.errors import ErrorCode, InferqError

log = logging.getLogger(__name__)
bp = Blueprint("files", __name__)
errors.install(bp)
FORM_OVERHEAD = 64 << 10  # multipart boundaries and the other fields


def owned_file(file_id: str) -> files.FileInfo:
    """The file, if the caller's tenant owns it (else the 404 an unknown id gets)."""
    info = files.get(resources().redis, file_id)
    if info is None or not auth.can_see(info.tenant):
        raise InferqError(ErrorCode.FILE_NOT_FOUND, f"no file {file_id!r}")
    return info


@bp.post("/v1/files")
def upload():
    cfg = current_app.config
    max_bytes, max_lines = int(cfg["FILE_MAX_BYTES"]), int(cfg["FILE_MAX_LINES"])
    if request.content_length is not None and request.content_length > max_bytes + FORM_OVERHEAD:
        raise _too_large(max_bytes)
    request.max_content_length = max_bytes + FORM_OVERHEAD
    if request.mimetype != "multipart/form-data":
        raise InferqError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "upload the file as multipart/form-data with fields "
                          "'file' and 'purpose'")
    purpose = request.form.get("purpose")
    if purpose != files.INPUT:
        raise errors.invalid("purpose", "purpose must be 'batch' (the only kind of file inferq keeps)")
    upload = request.files.get("file")
    if upload is None:
        raise errors.invalid("file", "the form has no 'file' part")
    content = upload.stream.read(max_bytes + 1)
    if len(content) > max_bytes:
        raise _too_large(max_bytes)
    # Bytes, as OpenAI takes them: a batch made from the file checks that it is UTF-8 JSONL, line by line.
    lines = sum(1 for line in content.splitlines() if line.strip())
    if lines > max_lines:
        raise errors.invalid("file", f"the file has {lines} requests; at most {max_lines} per file",
                             "too_many_lines")
    who = auth.principal()
    memory.check()
    try:
        info = files.store(resources().redis, who.name, purpose, (upload.filename or "upload.jsonl")[:256], content,
                           now_ms(), int(cfg["FILE_TTL_S"]), int(cfg["FILES_MAX_BYTES_PER_TENANT"]))
    except files.QuotaExceeded as exc:
        raise InferqError(ErrorCode.FILE_TOO_LARGE, f"tenant {who.name!r} already keeps {exc.used} bytes of files; "
                          f"at most {cfg['FILES_MAX_BYTES_PER_TENANT']} in all: delete some first") from None
    log.info("file %s: %d bytes, %d lines, for %s", info.id, info.bytes, lines, who.name)
    return jsonify(info.to_dict())


def _too_large(max_bytes: int) -> InferqError:
    return InferqError(ErrorCode.FILE_TOO_LARGE, f"a file is at most {max_bytes} bytes")


@bp.get("/v1/files")
def list_files():
    """The caller's files, newest first (OpenAI's ``limit``, default 100, and ``after``: the last id seen)."""
    return cursor_page(files.listing, 100, 10000, "file", ErrorCode.FILE_NOT_FOUND)


@bp.get("/v1/files/<file_id>")
def get_file(file_id: str):
    return jsonify(owned_file(file_id).to_dict())


class _Pieces(io.RawIOBase):
    """A file's pieces read from Redis one at a time, as send_file reads blocks: a download never holds
    the whole file."""

    def __init__(self, pieces):
        self._pieces, self._left = pieces, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._left:
            self._left = next(self._pieces, None)
            if self._left is None:
                self._left = b""
                return 0
        n = min(len(buffer), len(self._left))
        buffer[:n], self._left = self._left[:n], self._left[n:]
        return n


@bp.get("/v1/files/<file_id>/content")
def file_content(file_id: str):
    info = owned_file(file_id)
    r = resources().redis
    # The name is the uploader's: control characters cannot go in a header, and werkzeug quotes the rest
    # (and writes a non-ASCII name as RFC 5987's filename*), so a quote cannot end the header's value.
    name = "".join(c for c in info.filename if c.isprintable()) or "download.jsonl"
    response = send_file(io.BufferedReader(_Pieces(files.pieces(r, info.id)), files.PIECE_BYTES),
                         mimetype="application/octet-stream", as_attachment=True, download_name=name,
                         conditional=False)
    response.content_length = info.bytes
    return response


@bp.delete("/v1/files/<file_id>")
def delete_file(file_id: str):
    files.delete(resources().redis, owned_file(file_id))
    return jsonify(id=file_id, object="file", deleted=True)
