"""WSGI entry point: ``gunicorn -k gevent api.wsgi:app``."""
from api import create_app, lifecycle

app = create_app()
lifecycle.end_streams_on_shutdown()
