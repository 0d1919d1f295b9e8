"""WSGI entry point: ``gunicorn -k gevent api.wsgi:app``.

Each API process also reaps: a model's only worker dying is noticed here
(``queue_schema.reaper``), not only by other workers of that model.
"""
import os
import socket

from api import create_app, lifecycle
from api.extensions import resources
from queue_schema.reaper import Reaper

app = create_app()
lifecycle.end_streams_on_shutdown()
with app.app_context():
    reaper = Reaper(resources().redis, f"api-{socket.gethostname()}-{os.getpid()}", resources().eventlog)
reaper.start()
