"""inferq's HTTP API: a Flask app factory (``api.app``) and one blueprint per area.

Importing the package imports nothing more. gunicorn's master imports ``api.gunicorn_conf``
before its gevent workers patch the standard library: whatever this package pulled in then
(Flask, redis, urllib3 and their ``ssl``) would stay unpatched, and gevent says so on every
start. ``from api import create_app`` still works (PEP 562).
"""
from __future__ import annotations


def __getattr__(name: str):
    if name == "create_app":
        from api.app import create_app

        return create_app
    raise AttributeError(f"module 'api' has no attribute {name!r}")
