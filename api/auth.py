"""Bearer-token auth, on when ``INFERQ_API_TOKENS`` is set, and who a request is.

``INFERQ_API_TOKENS`` is a comma-separated list of ``token`` (the shared tenant
``default``) or ``name:token`` (a named tenant) entries, read as written. Set
but holding no token is a startup error, never auth off. Tokens are compared in
constant time. ``?access_token=`` is accepted on stream routes only, because a
browser's EventSource cannot set headers.

``INFERQ_ADMIN_TOKENS`` (same format; the name defaults to ``admin``) are
tokens that see every tenant's jobs, files and batches. rq-dashboard shows
every tenant's jobs and can empty their queues: with more than one tenant it
takes only admin tokens, and answers 403 ``ADMIN_ONLY`` while none is set.
Setting only admin tokens also turns auth on.

``principal()`` names the current request's tenant and the key its limits are
counted by (api/limits.py, and Redis-side admission). A job, file or batch
belongs to the tenant that made it; ``can_see`` says whether the current
request may know it exists (others get the 404 an unknown id gets).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass

from flask import Flask, current_app, g, request

from api.config import csv_setting
from api.errors import HTTPError
from queue_schema import keys
from queue_schema.errors import ConfigError, ErrorCode, InferqError
from queue_schema.lifecycle.tenants import ANONYMOUS, SHARED, Tenant

log = logging.getLogger(__name__)

# The page and its files are open: the page itself asks for a token.
OPEN_ENDPOINTS = {"health.health", "health.ready", "metrics.metrics", "static", "ui.index", "ui.static"}
QUERY_TOKEN_ENDPOINTS = {"stream.job_stream", "stream.narration"}
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHARED_TENANT = SHARED
ADMIN = "admin"
SHORT_TOKEN = 16


@dataclass(frozen=True)
class Principal:
    """Who made a request: the tenant ``name`` and the ``limit_key`` its limits count by."""

    name: str
    limit_key: str
    admin: bool = False  # sees every tenant's jobs, files and batches

    @property
    def tenant(self) -> Tenant:
        return Tenant(self.name, self.limit_key)


@dataclass(frozen=True)
class AuthConfig:
    tokens: tuple[tuple[bytes, Principal], ...] | None  # None: auth off
    high_priority: frozenset[str] | None  # None: every tenant may submit priority "high"


def parse_tokens(raw, admin_raw=None) -> tuple[tuple[bytes, Principal], ...] | None:
    """``INFERQ_API_TOKENS`` (and ``INFERQ_ADMIN_TOKENS``) as (token, principal) pairs; None when
    both are unset. Raises ConfigError."""
    entries, admins = csv_setting(raw), csv_setting(admin_raw)
    if entries is None and admins is None:
        return None
    owners: dict[str, Principal] = {}
    for setting, items, admin in (("INFERQ_API_TOKENS", entries, False), ("INFERQ_ADMIN_TOKENS", admins, True)):
        if items is not None and not items:
            raise ConfigError(f"{setting} is set but holds no token; unset it to turn auth off")
        for entry in items or ():
            name, sep, token = entry.partition(":")
            if not sep:
                name, token = (ADMIN if admin else SHARED_TENANT), entry
            name, token = name.strip(), token.strip()
            if not TENANT_PATTERN.match(name):
                raise ConfigError(f"{setting}: {name!r} is not a tenant name (letters, digits, '.', '_', '-'; "
                                  "entries are token or name:token)")
            if not token:
                raise ConfigError(f"{setting}: the entry for tenant {name!r} has no token after ':'")
            # A bare token's key must not reveal it, yet stay the same across processes and restarts;
            # the ":" keeps it (and "addr:...") apart from every tenant name.
            key = name if sep or admin else "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
            principal = Principal(name, key, admin)
            if owners.setdefault(token, principal) != principal:
                raise ConfigError(f"{setting}: one token is given to two tenants "
                                  f"({owners[token].name!r} and {name!r})")
            if len(token) < SHORT_TOKEN:
                log.warning("%s: the token of tenant %r is shorter than %d characters: easy to guess",
                            setting, name, SHORT_TOKEN)
    return tuple((token.encode(), p) for token, p in owners.items())


def match(presented: str | None, tokens) -> Principal | None:
    """The principal whose token was presented, or None."""
    if not presented:
        return None
    given = presented.encode()
    # Compare against every token so the time taken does not reveal which one matched.
    found = None
    for token, principal in tokens:
        if hmac.compare_digest(given, token):
            found = principal
    return found


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


def _config() -> AuthConfig:
    return current_app.extensions["inferq_auth"]


def _anonymous() -> Principal:
    # Behind a proxy every client shares the proxy's address, and so its limits.
    return Principal(ANONYMOUS, f"addr:{request.remote_addr or 'unknown'}")


def principal() -> Principal:
    """The current request's principal (anonymous, keyed by client address, while auth is off)."""
    found = g.get("inferq_principal")
    return found if found is not None else _anonymous()


def enabled() -> bool:
    """Is auth on (tokens set)?"""
    return _config().tokens is not None


def sees_everything() -> bool:
    return _config().tokens is None or principal().admin


def visible_jobs(client, job_ids) -> set[str]:
    """Of ``job_ids``, those the current request may know of (their tenants in one round trip)."""
    ids = list(dict.fromkeys(job_ids))
    if sees_everything() or not ids:
        return set(ids)
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(keys.job_info(job_id), "tenant")
    return {j for j, owner in zip(ids, pipe.execute()) if owner is not None and can_see(owner.decode())}


def can_see(owner: str | None) -> bool:
    """May the current request know of a job, file or batch that ``owner`` made? Admins see all;
    with auth off there is one tenant; things with no owner (RQ's own jobs) only admins see."""
    if _config().tokens is None:
        return True
    who = principal()
    return who.admin or (owner is not None and owner == who.name)


def check_request() -> None:
    tokens = _config().tokens
    if tokens is None or request.endpoint in OPEN_ENDPOINTS or request.method == "OPTIONS":
        return
    found = match(presented_token(), tokens)
    if found is None:
        # Browsers answer a Basic challenge with a login box: offer it on the dashboard.
        scheme = "Basic" if (request.blueprint or "") == "rq_dashboard" else "Bearer"
        raise HTTPError(ErrorCode.UNAUTHORIZED, "missing or invalid bearer token",
                        {"WWW-Authenticate": f'{scheme} realm="inferq"'})
    admins = any(p.admin for _, p in tokens)
    tenants = {p.name for _, p in tokens if not p.admin}
    if request.blueprint == "rq_dashboard" and not found.admin and (admins or len(tenants) > 1):
        # rq-dashboard shows every tenant's jobs and payloads, and can empty their queues: with more than
        # one tenant (or any admin configured) it is the admins' only.
        if not admins:
            raise InferqError(ErrorCode.ADMIN_ONLY, "rq-dashboard shows every tenant's jobs and can empty their "
                              "queues: it is open to admin tokens only, and none is set; set "
                              "INFERQ_ADMIN_TOKENS to open it")
        raise HTTPError(ErrorCode.UNAUTHORIZED, "rq-dashboard shows every tenant's jobs: use an admin token",
                        {"WWW-Authenticate": 'Basic realm="inferq"'})
    g.inferq_principal = found


def check_priority(priority: str) -> None:
    """Refuse priority "high" from a tenant not in ``INFERQ_HIGH_PRIORITY_TENANTS`` (when set)."""
    allowed = _config().high_priority
    if priority != "high" or allowed is None:
        return
    who = principal()
    if who.name not in allowed:
        raise InferqError(ErrorCode.PRIORITY_NOT_ALLOWED,
                          f"tenant {who.name!r} may not submit priority 'high'; use 'normal' or 'low'")


def init_app(app: Flask) -> None:
    tenants = csv_setting(app.config.get("HIGH_PRIORITY_TENANTS"))
    app.extensions["inferq_auth"] = AuthConfig(parse_tokens(app.config.get("API_TOKENS"),
                                                            app.config.get("ADMIN_TOKENS")),
                                               frozenset(tenants) if tenants is not None else None)
    app.before_request(check_request)
