"""Ending open streams when the API process is told to stop.

gunicorn waits up to its graceful timeout for requests to finish, and an SSE
stream never finishes by itself. ``end_streams_on_shutdown`` chains onto the
handlers gunicorn installed (it imports the app after installing them) and
sets ``stopping``; the stream loops check it at least once a second and end,
and clients reconnect (with Last-Event-ID) to a live API process.
"""
from __future__ import annotations

import signal
import threading

stopping = threading.Event()


def end_streams_on_shutdown(signals=(signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)) -> None:
    for sig in signals:
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue  # not under gunicorn: leave default handling alone

        def handler(signum, frame, previous=previous):
            stopping.set()
            previous(signum, frame)

        signal.signal(sig, handler)
