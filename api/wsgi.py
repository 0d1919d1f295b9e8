"""WSGI entry point: ``gunicorn -k gevent api.wsgi:app``."""
from api import create_app

app = create_app()
