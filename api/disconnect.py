"""Has the client of the current request gone away?

A request that waits for its job's answer writes nothing until the job ends,
so the server only learns that the client left when it finally writes: for
a 500-token job, minutes of a worker's time for nobody. The client's socket
says so at once: a closed connection is readable, and a peek reads nothing.
A client that sent its next request already (pipelining) is still there.

gunicorn hands the socket to the app as ``gunicorn.socket`` and werkzeug's
server as ``werkzeug.socket``; under any other server (Flask's test client)
nothing can be learned, and the client counts as present.
"""
from __future__ import annotations

import select
import socket
from collections.abc import Callable

from flask import request


def watcher() -> Callable[[], bool]:
    """A check for the current request's client having closed its connection (cheap: one poll)."""
    sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    if sock is None:
        return lambda: False

    def gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or already closed on our side
            return True

    return gone
