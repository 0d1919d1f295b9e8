"""rq-dashboard, mounted at ``/rq`` inside the API, made safe to open.

The library does not protect an embedded blueprint; the API's auth check
(``api.auth``) covers it like every other route, and accepts HTTP Basic
(any user name, a token as the password) so a browser can log in. Its write
actions are POST-only and same-origin (``api.security``).

Job data (a result holds the user's ``metadata`` and the model's output) is
user input, and rq-dashboard's JavaScript puts it into ``innerHTML`` unescaped.
Two layers keep it inert: its JSON answers are HTML-escaped here, and its pages
get a Content-Security-Policy that runs only the scripts it ships plus its one
inline block, marked with a per-response nonce (its templates have no inline
event handlers, so nothing else needs allowing).

RQ objects the dashboard builds never unpickle: see ``JSONOnly``.
"""
from __future__ import annotations

import html
import json
import logging
import re
import secrets

import rq.serializers
import rq_dashboard
from flask import Flask, current_app, request
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.serializers import JSONSerializer
from rq_dashboard.web import setup_rq_connection

from api.errors import error_response
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.lifecycle import connection

log = logging.getLogger(__name__)

# 'unsafe-eval': underscore's _.template, which renders every table, compiles with new Function().
# Never 'strict-dynamic': jQuery's .html() re-creates <script> tags found in markup, and
# strict-dynamic would trust the scripts a trusted script creates.
CSP = ("default-src 'none'; script-src 'self' 'nonce-{nonce}' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
# A <script> start tag without src: rq-dashboard's inline block and its text/template ones (harmless).
# Jinja escapes every value in these pages, so only the templates' own tags can match.
INLINE_SCRIPT = re.compile(r"<script(?=[\s>])(?![^>]*\bsrc\s*=)", re.IGNORECASE)
# The JSON its pages render: everything in them is escaped for HTML.
DATA_ENDPOINTS = {"rq_dashboard.job_info", "rq_dashboard.list_jobs", "rq_dashboard.list_workers",
                  "rq_dashboard.list_queues"}


class JSONOnly(JSONSerializer):
    """RQ's JSON serializer, reading bytes that are not JSON (a pickle someone else
    wrote, say) as a marker instead of failing the page; never unpickling them.

    rq-dashboard passes its ``serializer`` setting to some of its RQ calls only:
    ``Worker.all``, ``Queue.all``, ``Job.fetch`` in its job page and write actions,
    ``requeue_job`` and the registries fall back to RQ's default, pickle. Its
    workers view answered 500 while any worker was busy (a pickle read of a JSON
    job), and its job page would unpickle a job's ``meta``.
    """

    @staticmethod
    def loads(data, *args, **kwargs):
        try:
            return JSONSerializer.loads(data, *args, **kwargs)
        except ValueError:  # not UTF-8, or not JSON
            return {"unreadable": "not JSON (inferq never unpickles)"}


def _json_by_default() -> None:
    """Make RQ's default serializer JSONOnly in this process.

    RQ resolves "no serializer" to ``rq.serializers.PickleSerializer``, looked up
    when called (``resolve_serializer``), and the names ``DefaultSerializer``
    and ``"pickle"`` to the same class; the API never wants any of them.
    """
    rq.serializers.PickleSerializer = rq.serializers.DefaultSerializer = JSONOnly
    rq.serializers.SERIALIZER_ALIASES["pickle"] = JSONOnly
    rq_dashboard.web.config.serializer = JSONOnly
    if rq.serializers.resolve_serializer(None) is not JSONOnly:  # an RQ release resolving it another way
        raise RuntimeError("cannot make RQ's default serializer JSON; refusing to serve rq-dashboard with pickle")


def _escaped(value):
    if isinstance(value, str):
        return html.escape(value)
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    return value


def _check_instance() -> None:
    if request.blueprint != "rq_dashboard":
        return
    number = (request.view_args or {}).get("instance_number")
    if number is not None and number >= len(current_app.config["RQ_DASHBOARD_REDIS_URL"]):
        raise InferqError(ErrorCode.NOT_FOUND, f"no Redis instance {number} in this dashboard")


def _protect(response):
    if request.blueprint != "rq_dashboard" or response.is_streamed:
        return response
    if response.mimetype == "text/html":
        nonce = secrets.token_urlsafe(18)
        response.set_data(INLINE_SCRIPT.sub(f'<script nonce="{nonce}"', response.get_data(as_text=True)))
        response.headers["Content-Security-Policy"] = CSP.format(nonce=nonce)
    elif request.endpoint in DATA_ENDPOINTS and response.status_code == 200 and response.is_json:
        response.set_data(json.dumps(_escaped(response.get_json())))
    return response


def _unreadable(exc: DeserializationError):
    log.info("rq-dashboard: a job's data is not JSON; not decoded")
    return error_response(ErrorCode.JOB_UNREADABLE, "the job's stored data is not JSON (written by something "
                          "other than inferq); it is not decoded", 409)


def _no_such_job(exc: NoSuchJobError):
    return error_response(ErrorCode.JOB_NOT_FOUND, "no such job (unknown, or expired)", 404)


def init_app(app: Flask) -> None:
    _json_by_default()
    app.config.setdefault("RQ_DASHBOARD_REDIS_URL", app.config["REDIS_URL"])
    url = app.config["RQ_DASHBOARD_REDIS_URL"]
    if isinstance(url, str) and connection.is_sentinel(url):
        # rq-dashboard reads a Sentinel URL with the parser inferq uses, but takes the
        # sentinels' own password from this setting only, never from the URL.
        app.config.setdefault("RQ_DASHBOARD_REDIS_SENTINEL_PASSWORD", connection.sentinel_password(url))
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")
    setup_rq_connection(app)
    app.before_request(_check_instance)
    app.after_request(_protect)
    app.register_error_handler(DeserializationError, _unreadable)
    app.register_error_handler(NoSuchJobError, _no_such_job)
