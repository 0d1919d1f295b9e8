"""The Flask app factory: settings, extensions and every blueprint."""
from __future__ import annotations

import logging

from flask import Flask

from api import (
    auth,
    background,
    batches,
    catalog,
    config,
    dashboard,
    errors,
    extensions,
    files,
    health,
    hosts,
    jobs,
    limits,
    metrics,
    openapi,
    security,
    stream,
    ui,
)
from api.openai import responses as openai_responses
from api.openai import routes as openai_routes


def create_app(test_config: dict | None = None) -> Flask:
    """Build the API. Settings come from ``INFERQ_``-prefixed environment variables
    (plus ``REDIS_URL``), overridden by ``test_config``. A setting it cannot start
    with raises ``api.config.ConfigError`` (one line)."""
    app = Flask(__name__)
    app.config.from_mapping(config.DEFAULTS)
    config.load_environment(app)
    if test_config:
        app.config.from_mapping(test_config)
    app.json.sort_keys = False
    logging.getLogger(__name__).debug("inferq api starting")

    extensions.init_app(app)
    errors.init_app(app)
    hosts.init_app(app)  # first of the request checks
    auth.init_app(app)
    security.init_app(app)
    limits.init_app(app)
    background.init_app(app)
    for bp in (health.bp, metrics.bp, jobs.bp, stream.bp, catalog.bp, openai_routes.bp, files.bp, batches.bp,
               openapi.bp, ui.bp, openai_responses.bp):
        app.register_blueprint(bp)
    dashboard.init_app(app)
    return app
