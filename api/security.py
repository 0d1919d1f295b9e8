"""What keeps another site's page from using a browser against the API.

- Writes (POST, PUT, PATCH, DELETE) must come from the API's own origin: a
  cross-site ``Origin`` (or, from browsers that send none, ``Sec-Fetch-Site``
  or ``Referer``) is a 403 ``FORBIDDEN_ORIGIN``. A request with none of them is
  not a browser's and goes through: CSRF needs a browser.
- The JSON routes take ``Content-Type: application/json`` only (415 otherwise):
  a cross-site page can send ``text/plain`` or form bodies without a CORS
  preflight, never JSON. With auth off, and with the Basic credentials a
  browser keeps for ``/rq``, these two are what stands between a page and
  ``POST /v1/jobs``.
- rq-dashboard's write actions are POST-only (its ``requeue_all`` also took GET).
- Every response says ``nosniff`` (a JSON answer is never run as a script or
  sniffed into HTML) and no framing; the page at ``/`` gets a Content-Security-Policy
  that loads only its own files, and ``/rq`` sets its own (api/dashboard.py).
"""
from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, current_app, request
from werkzeug.exceptions import MethodNotAllowed

from api.config import csv_setting
from queue_schema.errors import ErrorCode, InferqError

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
JSON_ENDPOINTS = {"jobs.create_job", "jobs.create_inference", "openai.completions", "openai.chat_completions",
                  "openai.embeddings", "batches.create_batch"}
# rq-dashboard 0.9's blueprint: every route that changes Redis.
DASHBOARD_WRITES = {"rq_dashboard.delete_job_view", "rq_dashboard.requeue_job_view", "rq_dashboard.requeue_all",
                    "rq_dashboard.empty_queue", "rq_dashboard.compact_queue"}

# api/static/app.js: its own script and style files, fetch and EventSource to the API.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin"}


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else "null"


def _same_origin(origin: str) -> bool:
    if origin == "null":  # sandboxed frames, file: pages, some redirects
        return False
    if origin in current_app.extensions["inferq_trusted_origins"]:
        return True
    # The host only, not the scheme: behind a TLS-terminating proxy the API sees http
    # while the browser's Origin says https.
    return urlsplit(origin).netloc.lower() == request.host.lower()


def cross_site_reason() -> str | None:
    """Why the current request looks like another site's, or None."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return None if _same_origin(_origin_of(origin)) else f"Origin {origin}"
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return None if fetch_site in ("same-origin", "none") else f"Sec-Fetch-Site {fetch_site}"
    referer = request.headers.get("Referer")
    if referer and not _same_origin(_origin_of(referer)):
        return "Referer from another origin"
    return None


def check_request() -> None:
    if request.endpoint in DASHBOARD_WRITES and request.method != "POST":
        raise MethodNotAllowed(valid_methods=["POST"])
    if request.method in UNSAFE_METHODS:
        reason = cross_site_reason()
        if reason is not None:
            raise InferqError(ErrorCode.FORBIDDEN_ORIGIN,
                              f"cross-site write refused ({reason}): call the API from its own origin")
    if request.method == "POST" and request.endpoint in JSON_ENDPOINTS and request.mimetype != "application/json":
        raise InferqError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send the body as JSON with "
                          f"Content-Type: application/json (got {request.mimetype or 'none'!r})")


def add_headers(response):
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if request.endpoint == "ui.index":
        response.headers["Content-Security-Policy"] = PAGE_CSP
    return response


def init_app(app: Flask) -> None:
    app.extensions["inferq_trusted_origins"] = frozenset(
        _origin_of(o) for o in csv_setting(app.config.get("TRUSTED_ORIGINS")) or ())
    app.before_request(check_request)
    app.after_request(add_headers)
