"""WSGI entry point: ``gunicorn -k gevent api.wsgi:app``.

Each API process also reaps: a model's only worker dying is noticed here
(``queue_schema.lifecycle.reaper``), not only by other workers of that model; and it
delivers webhooks and advances batches (``api/background.py``).
"""
import os
import socket

from api import create_app, shutdown
from api.background import Background
from api.extensions import now_ms, resources
from queue_schema.lifecycle import connection, events_url
from queue_schema.lifecycle.reaper import Reaper

app = create_app()
shutdown.end_streams_on_shutdown()
identity = f"api-{socket.gethostname()}-{os.getpid()}"
with app.app_context():
    # Refused (one line, and gunicorn does not boot) where the fleet keeps its job logs elsewhere.
    events_url.claim(resources().redis, connection.store_identity(app.extensions["inferq_events_url"]), identity,
                     now_ms())
    reaper = Reaper(resources().redis, identity, resources().eventlog, resources().settings)
reaper.start()
background = Background(app, identity)
background.start()
