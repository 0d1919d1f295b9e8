"""rq-dashboard, mounted at ``/rq`` inside the API.

The library does not protect an embedded blueprint; the API's auth check
(``api.auth``) covers it like every other route, and accepts HTTP Basic
(any user name, a token as the password) so a browser can log in.
"""
from __future__ import annotations

import rq_dashboard
from flask import Flask
from rq.serializers import JSONSerializer
from rq_dashboard.web import setup_rq_connection


def init_app(app: Flask) -> None:
    app.config.setdefault("RQ_DASHBOARD_REDIS_URL", app.config["REDIS_URL"])
    rq_dashboard.web.config.serializer = JSONSerializer  # inferq never pickles
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")
    setup_rq_connection(app)
