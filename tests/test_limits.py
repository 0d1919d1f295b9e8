"""Open SSE streams are bounded per principal and per API process, and a flood cannot starve /health."""
import json
import selectors
import socket
import statistics
import time

import pytest
import requests

from api import create_app
from tests.conftest import start_api, wait_until

A, B = "alice:token-of-alice-0001", "bob:token-of-bob-00000001"


def bearer(entry: str) -> dict:
    return {"Authorization": "Bearer " + entry.partition(":")[2]}


def open_stream(client, headers):
    return client.get("/v1/narration?backlog=0", headers=headers, buffered=False)


# The test client runs every request in this one thread, and an open stream holds its request
# context pushed: streams open at once must be closed newest first (a server gives each its own).
def test_streams_per_principal_and_per_process(redis_url):
    app = create_app({"REDIS_URL": redis_url, "TESTING": True, "API_TOKENS": f"{A},{B}",
                      "MAX_STREAMS_PER_TOKEN": 2, "MAX_STREAMS": 3})
    client = app.test_client()
    slots = app.extensions["inferq_streams"]
    a1, a2 = open_stream(client, bearer(A)), open_stream(client, bearer(A))
    assert (a1.status_code, a2.status_code) == (200, 200)
    refused = open_stream(client, bearer(A))
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    err = refused.get_json()["error"]
    assert err["code"] == "TOO_MANY_STREAMS" and "you have 2 streams open" in err["message"]
    b1 = open_stream(client, bearer(B))  # another tenant has its own allowance...
    assert b1.status_code == 200
    over = open_stream(client, bearer(B))  # ...inside the process's
    assert over.status_code == 429 and "this API process" in over.get_json()["error"]["message"]
    assert (slots.open_count(), slots.open_count("alice"), slots.open_count("bob")) == (3, 2, 1)
    # A stream's slot comes back when its response is closed, even one never read from.
    b1.close()
    a2.close()
    assert (slots.open_count(), slots.open_count("alice")) == (1, 1)
    again = open_stream(client, bearer(A))
    assert again.status_code == 200 and slots.open_count("alice") == 2
    again.close()
    a1.close()
    assert slots.open_count() == 0
    # Refusals and errors hold nothing.
    assert client.get("/v1/jobs/nope/stream", headers=bearer(A)).status_code == 404
    assert slots.open_count() == 0


def test_with_auth_off_only_the_process_bound_applies(redis_url):
    """With auth off every local client shares one address: a local agent holding many calls open is one
    user, and must not meet the per-principal bound (it met 429s past 100 before); the process bound,
    which keeps /health answering, still holds."""
    app = create_app({"REDIS_URL": redis_url, "TESTING": True, "MAX_STREAMS_PER_TOKEN": 1, "MAX_STREAMS": 3})
    client = app.test_client()

    def from_address(addr):
        return client.get("/v1/narration?backlog=0", buffered=False, environ_base={"REMOTE_ADDR": addr})

    opened = [from_address("127.0.0.1") for _ in range(3)]
    assert [r.status_code for r in opened] == [200, 200, 200]
    refused = from_address("127.0.0.1")
    assert refused.status_code == 429 and "this API process" in refused.get_json()["error"]["message"]
    for resp in reversed(opened):  # streamed responses hold request contexts: closed last-opened first
        resp.close()
    assert app.extensions["inferq_streams"].open_count() == 0


REQUEST = b"GET /v1/narration?backlog=0 HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"


def read_heads(socks: list[socket.socket], timeout: float) -> dict[socket.socket, bytes]:
    """Each socket's response head (status line and headers), read together."""
    heads = {s: b"" for s in socks}
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    pending = len(socks)
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            chunk = s.recv(65536)
            heads[s] += chunk
            if b"\r\n\r\n" in heads[s] or not chunk:
                sel.unregister(s)
                pending -= 1
    sel.close()
    return heads


def probe(url: str) -> tuple[int, float]:
    t0 = time.monotonic()
    resp = requests.get(url, timeout=5)
    return resp.status_code, time.monotonic() - t0


@pytest.mark.slow
def test_a_flood_of_streams_gets_429s_and_health_keeps_answering(redis_url, tmp_path):
    """1,100 streams on one gunicorn+gevent process: 900 open, 200 refused, /health and /ready quick."""
    # One address: let the process bound decide.
    api = start_api(redis_url, tmp_path / "gunicorn.log", MAX_STREAMS_PER_TOKEN=100000)
    url, port = api.url, api.port
    socks: list[socket.socket] = []
    try:
        for _ in range(1100):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(REQUEST)
            socks.append(s)
        heads = read_heads(socks, timeout=60)
        statuses = [h.split(b" ", 2)[1] if h.startswith(b"HTTP/1.1 ") else b"none" for h in heads.values()]
        assert statuses.count(b"200") == 900 and statuses.count(b"429") == 200, sorted(set(statuses))
        refused = next(h for h in heads.values() if b" 429 " in h.split(b"\r\n")[0])
        assert b"Retry-After: 5" in refused and b"application/json" in refused
        # While all of them are open: the process still answers, and fast.
        health = [probe(url + "/health") for _ in range(5)]
        assert all(status == 200 for status, _ in health)
        assert statistics.median(t for _, t in health) < 1.0, health
        status, took = probe(url + "/ready")
        assert status in (200, 503) and took < 2.0
        # Another stream is refused with the JSON error, not left hanging.
        resp = requests.get(url + "/v1/narration?backlog=0", timeout=5)
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "TOO_MANY_STREAMS"
    finally:
        for s in socks:
            s.close()
    try:
        # The slots come back once the keep-alive writes find the clients gone.
        wait_until(lambda: _stream_opens(url), timeout=20, what="a stream to open after the flood")
        assert api.proc.poll() is None, api.log()
    finally:
        api.stop(timeout=30)


def _stream_opens(url) -> bool:
    with requests.get(url + "/v1/narration?backlog=0", stream=True, timeout=5) as resp:
        if resp.status_code == 200:
            return True
        assert resp.status_code == 429 and json.loads(resp.content)["error"]["code"] == "TOO_MANY_STREAMS"
        return False
