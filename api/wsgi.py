"""WSGI entry point: ``gunicorn -k gevent api.wsgi:app``.

Each API process also reaps: a model's only worker dying is noticed here
(``queue_schema.lifecycle.reaper``), not only by other workers of that model; and it
delivers webhooks and advances batches (``api/background.py``).
"""
import os
import socket

from api import create_app, shutdown
from api.background import Background
from api.extensions import resources
from queue_schema.lifecycle.reaper import Reaper

app = create_app()
shutdown.end_streams_on_shutdown()
identity = f"api-{socket.gethostname()}-{os.getpid()}"
with app.app_context():
    reaper = Reaper(resources().redis, identity, resources().eventlog, resources().settings)
reaper.start()
background = Background(app, identity)
background.start()
