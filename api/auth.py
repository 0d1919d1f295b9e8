"""Bearer-token auth, on when ``INFERQ_API_TOKENS`` is set.

Tokens are compared in constant time. ``?access_token=`` is accepted on
stream routes only, because a browser's EventSource cannot set headers.
"""
from __future__ import annotations

import hmac

from flask import Flask, current_app, request

from queue_schema.errors import ErrorCode, InferqError

# The page and its files are open: the page itself asks for a token.
OPEN_ENDPOINTS = {"health.health", "health.ready", "metrics.metrics", "static", "ui.index", "ui.static"}
QUERY_TOKEN_ENDPOINTS = {"stream.job_stream", "stream.narration"}


def configured_tokens(app: Flask) -> list[bytes]:
    raw = app.config.get("API_TOKENS") or ""
    if isinstance(raw, (list, tuple)):
        raw = ",".join(raw)
    return [t.strip().encode() for t in str(raw).split(",") if t.strip()]


def token_ok(presented: str | None, tokens: list[bytes]) -> bool:
    if not presented:
        return False
    given = presented.encode()
    # Compare against every token so the time taken does not reveal which one matched.
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given, token)
    return ok


def presented_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    if scheme.lower() == "basic" and request.authorization is not None:
        return request.authorization.password  # any user name; the token is the password
    if request.endpoint in QUERY_TOKEN_ENDPOINTS:
        return request.args.get("access_token")
    return None


def check_request() -> None:
    tokens = current_app.extensions["inferq_tokens"]
    if not tokens or request.endpoint in OPEN_ENDPOINTS or request.method == "OPTIONS":
        return
    if not token_ok(presented_token(), tokens):
        # Browsers answer a Basic challenge with a login box: offer it on the dashboard.
        scheme = "Basic" if (request.blueprint or "") == "rq_dashboard" else "Bearer"
        raise InferqError(ErrorCode.UNAUTHORIZED, "missing or invalid bearer token",
                          headers={"WWW-Authenticate": f'{scheme} realm="inferq"'})


def init_app(app: Flask) -> None:
    app.extensions["inferq_tokens"] = configured_tokens(app)
    app.before_request(check_request)
