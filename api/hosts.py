"""DNS rebinding: with auth off, the API answers only requests whose ``Host`` names this machine.

A page on ``evil.example`` can make its own name resolve to 127.0.0.1 after it
loaded. Its scripts then reach an API on loopback as ``evil.example:8000``:
same origin as far as the browser knows, with ``Origin`` and ``Host`` both
saying ``evil.example``, so the cross-site check (api/security.py) passes.
What tells such a request apart is the name in ``Host``: a rebinding page can
only send its own. So, while auth is off (tokens protect the API otherwise),
a request is answered only when ``Host`` is

- ``localhost``, ``127.0.0.1`` or ``[::1]``, any port;
- the address the server is bound to (``SERVER_NAME``, which gunicorn and
  werkzeug set from the listening socket); with a wildcard bind (``0.0.0.0``,
  ``::``) any of the machine's own interface addresses;
- a name in ``INFERQ_ALLOWED_HOSTS`` (comma-separated, ``*`` turns the check off).

Anything else is a 403 ``HOST_NOT_ALLOWED`` naming the setting to change.
``/health`` and ``/ready`` answer any ``Host``: probes use whatever name
their platform gives them, and they reveal nothing. Ollama's CVE-2024-28224
was this hole; Jupyter closes it the same way (``local_hostnames``).
"""
from __future__ import annotations

import functools
import ipaddress
import socket

from flask import Flask, current_app, request

from api.config import csv_setting
from queue_schema.errors import ErrorCode, InferqError

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
OPEN_ENDPOINTS = frozenset({"health.health", "health.ready"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", "", "*"})
ANY = "*"


def host_name(host: str) -> str:
    """The name in a ``Host`` header, without its port or brackets, lower case, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host[1:]
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def _address(name: str):
    try:
        return ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return None


@functools.lru_cache(maxsize=1)
def interface_addresses() -> frozenset:
    """This machine's own addresses (IPv4 and IPv6), for a server bound to every interface."""
    found: set = set()
    try:  # what the host name resolves to: usually the primary address
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(info[4][0])
    except OSError:
        pass
    found |= _ipv4_by_interface()
    try:  # Linux lists every IPv6 address here, one per line, as 32 hex digits first
        with open("/proc/net/if_inet6") as f:
            for line in f:
                raw = line.split()[0]
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    except (OSError, ValueError):
        pass
    return frozenset(a for a in map(_address, found) if a is not None)


def _ipv4_by_interface() -> set[str]:
    try:
        import fcntl
        import struct
    except ImportError:  # not a Unix
        return set()
    out = set()
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode()))
            except OSError:  # an interface without an IPv4 address
                continue
            out.add(socket.inet_ntoa(packed[20:24]))
    return out


def allowed(name: str, server_name: str, extra: frozenset[str]) -> bool:
    """May a request whose ``Host`` is ``name`` be answered by a server bound to ``server_name``?"""
    if name in LOCAL_NAMES or name in extra:
        return True
    address = _address(name)
    if address is not None and address.is_loopback:
        return True
    bound = host_name(server_name or "")
    if name == bound and bound not in WILDCARD_BINDS:
        return True
    return bound in WILDCARD_BINDS and address is not None and address in interface_addresses()


def _bound_to() -> str:
    """The address the server listens on. On a Unix socket gunicorn fills SERVER_NAME from the Host header
    itself, which proves nothing: then no bind address counts."""
    sock = request.environ.get("gunicorn.socket")
    if sock is not None and getattr(sock, "family", None) == getattr(socket, "AF_UNIX", None):
        return "unix:"
    return request.environ.get("SERVER_NAME", "")


def check_request() -> None:
    extra = current_app.extensions["inferq_allowed_hosts"]
    if extra is None or request.endpoint in OPEN_ENDPOINTS:
        return
    raw = request.headers.get("Host", "")
    if allowed(host_name(raw), _bound_to(), extra):
        return
    raise InferqError(ErrorCode.HOST_NOT_ALLOWED, f"Host {raw!r} is not answered while auth is off (a guard "
                      "against DNS rebinding): add the name to INFERQ_ALLOWED_HOSTS (comma-separated; '*' turns "
                      "the check off), or turn auth on with INFERQ_API_TOKENS")


def init_app(app: Flask) -> None:
    """The check runs first, before any other: a rebinding page must learn nothing, not even an auth error."""
    names = csv_setting(app.config.get("ALLOWED_HOSTS")) or []
    # The test api/auth.py makes: either setting present turns auth on.
    auth_on = any(csv_setting(app.config.get(k)) is not None for k in ("API_TOKENS", "ADMIN_TOKENS"))
    off = auth_on or ANY in names
    app.extensions["inferq_allowed_hosts"] = None if off else frozenset(host_name(n) for n in names)
    app.before_request(check_request)
