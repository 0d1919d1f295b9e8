"""One webhook attempt over the wire: the address checked as it is connected, a total deadline, a capped read.

``requests`` (used before) has per-read timeouts only: a receiver that answers
one byte every few seconds held an attempt, a sender thread and its claim for
ever. Here the attempt owns its socket: a timer shuts it down when the
deadline passes, whatever the read is waiting for, so no attempt outlives
``deadline_s``. Only the status line and headers are read (http.client bounds
their number and length); the body is never read, so it cannot grow memory.

The host name was allowed at submit (``INFERQ_WEBHOOK_ALLOW_HOSTS``), but a
name can resolve to anything at send time: to 127.0.0.1, or the cloud's
metadata address. So the name is resolved here, every address it gives that
is private, loopback, link-local, multicast or reserved is refused unless the
allow-list names that address itself, and the connection goes to the address
that was checked (never resolved a second time). HTTPS still verifies the
certificate against the name.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from queue_schema.errors import CodedError

CONNECT_S = 2.0


class SendError(CodedError):
    """The attempt failed before a status came back; the message says why in a few words."""


def _ip_allowed(address: str, allow_hosts: frozenset[str], port: int) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.is_global and not ip.is_multicast:
        return True
    shown = str(ip) if ip.version == 4 else f"[{ip}]"
    return str(ip) in allow_hosts or f"{shown}:{port}" in allow_hosts or f"{ip}:{port}" in allow_hosts


def resolve(host: str, port: int, allow_hosts: frozenset[str]) -> str:
    """The address to connect to: the first the name resolves to that may be called."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SendError(f"cannot resolve {host}: {exc.strerror}") from None
    refused = []
    for info in infos:
        address = info[4][0]
        if _ip_allowed(address, allow_hosts, port):
            return address
        refused.append(address)
    raise SendError(f"{host} resolves to {', '.join(refused)}: a private or local address that "
                    "INFERQ_WEBHOOK_ALLOW_HOSTS does not name")


class _Connection(http.client.HTTPConnection):
    """http.client on a socket this module connected (to a checked address)."""

    def __init__(self, host: str, port: int, sock: socket.socket, default_port: int):
        super().__init__(host, port)
        self.default_port = default_port  # the Host header leaves out the scheme's own port
        self.sock = sock  # http.client connects only when it has no socket


def post(url: str, body: bytes, headers: dict[str, str], deadline_s: float, allow_hosts: frozenset[str]) -> int:
    """POST ``body``; the HTTP status, or SendError. Never longer than ``deadline_s`` in all."""
    deadline = time.monotonic() + deadline_s
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = resolve(parts.hostname, port, allow_hosts)
    try:
        sock = socket.create_connection((address, port), timeout=min(CONNECT_S, deadline_s))
    except OSError as exc:
        raise SendError(f"cannot connect to {address}:{port}: {exc.__class__.__name__}") from None
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _cut, (sock,))
    timer.daemon = True
    timer.start()
    try:
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
            timer.args = (sock,)
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        conn = _Connection(parts.hostname, port, sock, 443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", path, body=body, headers={**headers, "Connection": "close"})
        response = conn.getresponse()
        return response.status
    except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
        if time.monotonic() >= deadline - 0.01:
            raise SendError(f"no answer within {deadline_s:g} s") from None
        raise SendError(exc.__class__.__name__) from None
    finally:
        timer.cancel()
        try:
            sock.close()
        except OSError:
            pass


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass
