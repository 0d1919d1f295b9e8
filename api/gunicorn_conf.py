"""gunicorn settings for every inferq API launch: ``gunicorn --config python:api.gunicorn_conf api.wsgi:app``.

Command-line flags (``--workers``, ``--bind``...) still apply on top of these.
"""
from __future__ import annotations

import resource

worker_class = "gevent"
# Each open SSE stream holds one of a process's connections for as long as it is open.
# The API refuses streams past INFERQ_MAX_STREAMS (900 by default, api/limits.py), so
# the rest of these stay free for /health, /ready and ordinary requests; gevent's
# default of 1,000 would leave a flood of streams only 100.
worker_connections = 2000


def _raise_open_files_limit(want: int = 4 * worker_connections) -> None:
    # One descriptor per connection, plus Redis and files: a common soft limit of 1,024
    # would fail accepts long before worker_connections. Raised up to the hard limit only.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


_raise_open_files_limit()
