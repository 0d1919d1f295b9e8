"""OpenAI's cursor pages for a caller's own things (files, batches): ``limit``, ``after``, ``has_more``."""
from __future__ import annotations

from flask import jsonify, request

from api import auth
from api.extensions import resources
from api.openai import errors
from queue_schema.errors import ErrorCode


def ids_after(client, index: str, after: str | None, limit: int) -> list[str] | None:
    """Up to ``limit + 1`` ids of a newest-first sorted set after the id ``after`` (the one more says whether
    there are more); None when ``after`` is not in it. By rank, not by score: things made in the same
    millisecond tie on the score, and a page ending inside a tie must not skip the rest of it."""
    start = 0
    if after:
        rank = client.zrevrank(index, after)
        if rank is None:
            return None
        start = rank + 1
    return [i.decode() for i in client.zrevrange(index, start, start + limit)]


def cursor_page(listing, default_limit: int, max_limit: int, what: str, not_found: ErrorCode):
    """``limit`` and ``after`` (the last id seen) from the query, ``listing(redis, tenant, limit, after)``
    giving ``(items, has_more)`` newest first, or None when ``after`` is not one of the caller's ``what``:
    a 404 that says so (``not_found``), not a quietly empty page."""
    try:
        limit = int(request.args.get("limit", default_limit))
    except ValueError:
        limit = 0
    if not 1 <= limit <= max_limit:
        raise errors.invalid("limit", f"limit must be an integer from 1 to {max_limit}")
    after = request.args.get("after") or None
    page = listing(resources().redis, auth.principal().name, limit, after)
    if page is None:
        raise errors.OpenAIError(not_found, f"after: no {what} {after!r} of yours (unknown, deleted or expired); "
                                 "page from the start, or from the last_id of a page this API returned", 404,
                                 "after")
    found, more = page
    data = [item.to_dict() for item in found]
    return jsonify(object="list", data=data, first_id=data[0]["id"] if data else None,
                   last_id=data[-1]["id"] if data else None, has_more=more)
