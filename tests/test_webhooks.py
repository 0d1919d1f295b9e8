"""Webhooks: signed as Standard Webhooks says, retried after a failure, never redirected, allowed hosts only."""
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from api import webhooks
from inferq.client import Client
from queue_schema import keys
from tests.conftest import TenantAPI, wait_until
from tests.helpers import bearer, serve_fake_model


def verify(secret: str, headers, body: bytes) -> bool:
    """Standard Webhooks verification, written from the spec, not from inferq's code."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(sig.partition(",")[2] == expected for sig in headers["webhook-signature"].split(" "))


def test_signature_matches_the_specs_example():
    # The example in the Standard Webhooks specification.
    key = webhooks.parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert webhooks.sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}') == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    for bad in ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_c2hvcnQ="):
        with pytest.raises(webhooks.WebhookConfigError):
            webhooks.parse_secret(bad)


@pytest.mark.parametrize("url,ok", [
    ("http://127.0.0.1:8080/hook", True), ("https://HOOKS.example.com/x", True),
    ("http://10.0.0.1/hook", False), ("http://localhost/hook", False), ("ftp://127.0.0.1/x", False),
    ("http://user:pw@127.0.0.1/x", False), ("http://127.0.0.1:99999/x", False), ("/relative", False),
    ("http://hooks.example.com.evil.net/x", False)])
def test_only_allowed_hosts_may_be_called(url, ok):
    assert (webhooks.url_problem(url, frozenset({"127.0.0.1", "hooks.example.com"})) is None) == ok


class Receiver:
    """A webhook receiver on loopback: answers each path with the statuses scripted for it, in turn."""

    def __init__(self, script: dict[str, list[int]]):
        self.script, self.seen = {k: list(v) for k, v in script.items()}, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                statuses = outer.script.get(self.path) or [200]
                status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
                self.send_response(status)
                if status in (301, 302, 307, 308):
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver():
    made = []

    def make(script):
        made.append(Receiver(script))
        return made[-1]

    yield make
    for rec in made:
        rec.close()


def ended(api: TenantAPI, job_id: str) -> dict:
    """Wait for the job's end (a loaded machine may queue it a while): what follows times the webhook only."""
    return list(Client(api.url, token=api.ALICE, timeout=60).events(job_id))[-1]


def submit(api: TenantAPI, **fields):
    body = {"operation": "infer", "model": "tiny", "prompt": "def data", "max_tokens": 3, "temperature": 0, **fields}
    return requests.post(f"{api.url}/v1/jobs", json=body, headers=bearer(api.ALICE), timeout=30)


@pytest.mark.usefixtures("tiny_worker")
def test_a_finished_job_is_posted_signed_and_retried_after_a_500(tenant_api, receiver, r):
    hook = receiver({"/hook": [500, 200]})
    job = submit(tenant_api, webhook_url=hook.url + "/hook").json()["job_id"]
    ended(tenant_api, job)
    wait_until(lambda: len(hook.seen) >= 2, timeout=15, what="the retry")
    time.sleep(0.5)  # nothing more may come: the second attempt got its 200
    assert len(hook.seen) == 2
    (_, first, body1), (_, second, body2) = hook.seen
    assert first["webhook-id"] == second["webhook-id"] == f"msg_job_{job}" and body1 == body2
    for headers, body in ((first, body1), (second, body2)):
        assert verify(TenantAPI.WEBHOOK_SECRET, headers, body)
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert not verify("whsec_" + base64.b64encode(b"another-key-of-32-bytes-length!!").decode(), first, body1)
    event = json.loads(body1)
    assert event["type"] == "job.finished" and event["data"]["id"] == job and event["data"]["state"] == "finished"
    assert event["data"]["result"]["tokens_out"] == 3
    record = webhooks.Deliveries(r).record(f"job_{job}")
    assert record["result"] == "delivered" and record["attempts"] == "2"


@pytest.mark.usefixtures("tiny_worker")
def test_a_redirect_is_not_followed_and_a_failed_job_is_reported(tenant_api, receiver):
    hook = receiver({"/hook": [302, 204]})
    job = submit(tenant_api, prompt="word " * 600, max_tokens=16, webhook_url=hook.url + "/hook").json()["job_id"]
    ended(tenant_api, job)
    wait_until(lambda: len(hook.seen) >= 2, timeout=15, what="the retry")
    assert [path for path, _, _ in hook.seen] == ["/hook", "/hook"]  # never /elsewhere
    event = json.loads(hook.seen[-1][2])
    assert event["type"] == "job.failed" and event["data"]["error"]["code"] == "CONTEXT_LENGTH_EXCEEDED"
    assert event["data"]["id"] == job


def test_a_cancelled_job_is_reported_by_whichever_process_ends_it(tenant_api, receiver, r):
    model = "hooked-" + uuid.uuid4().hex[:6]
    serve_fake_model(r, model)  # nobody runs it: the API's cancel writes its end
    hook = receiver({"/hook": [200]})
    job = submit(tenant_api, model=model, webhook_url=hook.url + "/hook").json()["job_id"]
    assert requests.delete(f"{tenant_api.url}/v1/jobs/{job}", headers=bearer(tenant_api.ALICE),
                           timeout=10).json()["state"] == "cancelled"
    wait_until(lambda: hook.seen, timeout=10, what="the webhook")
    assert json.loads(hook.seen[0][2])["type"] == "job.cancelled"
    assert not r.zscore(keys.WEBHOOKS_DUE, f"job_{job}")


def test_a_webhook_to_a_host_not_allowed_is_refused_at_submit(tenant_api):
    for url in ("http://10.1.2.3/hook", "http://localhost:9/hook", "file:///etc/passwd"):
        resp = submit(tenant_api, webhook_url=url)
        assert resp.status_code == 422, url
        err = resp.json()["error"]
        assert err["code"] == "INVALID_REQUEST" and err["errors"][0]["field"] == "webhook_url"


class Trickler:
    """A receiver on loopback that answers one byte every ``every`` seconds, for ever (until closed)."""

    def __init__(self, every: float = 3.0):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.every, self.accepted, self._open = every, 0, True
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while self._open:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        try:
            for byte in b"HTTP/1.1 200 OK\r\n" * 1000:
                conn.send(bytes([byte]))
                time.sleep(self.every)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self._open = False
        self.sock.close()


def test_one_attempt_never_outlives_its_deadline_however_slowly_the_receiver_answers():
    from api import webhook_sender

    slow = Trickler(every=0.5)
    try:
        began = time.monotonic()
        with pytest.raises(webhook_sender.SendError, match="no answer within 1.5 s"):
            webhook_sender.post(slow.url + "/hook", b"{}", {"Content-Type": "application/json"}, 1.5,
                                frozenset({"127.0.0.1"}))
        assert time.monotonic() - began < 2.5  # requests' per-read timeout let it run for ever
    finally:
        slow.close()


def test_a_name_that_resolves_to_a_private_address_is_refused_at_send_time(receiver):
    from api import webhook_sender

    hook = receiver({"/hook": [200]})
    port = hook.server.server_port
    # "localhost" is on the list, but what it resolves to (loopback) is not named: refused as it is sent.
    with pytest.raises(webhook_sender.SendError, match="private or local address"):
        webhook_sender.post(f"http://localhost:{port}/hook", b"{}", {}, 2.0, frozenset({"localhost"}))
    assert hook.seen == []
    # The list naming the address itself lets it through; so does the literal address.
    assert webhook_sender.post(f"http://localhost:{port}/hook", b"{}", {}, 2.0,
                               frozenset({"localhost", "127.0.0.1"})) == 200
    assert webhook_sender.post(f"http://127.0.0.1:{port}/hook", b"{}", {}, 2.0, frozenset({"127.0.0.1"})) == 200


def test_each_tenant_signs_with_its_own_secret(tmp_path, receiver):
    """With INFERQ_WEBHOOK_SECRETS a tenant's deliveries are signed with its own key: another tenant cannot
    forge them (one key for all let any tenant sign for another's receiver). Others use the global key."""
    from api import create_app
    from api.background import Background
    from inferq.embedded_redis import EmbeddedRedis

    alice_secret = "whsec_" + base64.b64encode(b"alice-only-webhook-key-32-bytes!").decode()
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    try:
        app = create_app({"REDIS_URL": server.url, "TESTING": True, "API_TOKENS": "alice:tok-a-0123456789abcd,"
                          "bob:tok-b-0123456789abcd", "WEBHOOK_SECRET": TenantAPI.WEBHOOK_SECRET,
                          "WEBHOOK_SECRETS": f"alice:{alice_secret}", "WEBHOOK_ALLOW_HOSTS": "127.0.0.1"})
        client = app.test_client()
        import redis as redis_py

        serve_fake_model(redis_py.Redis.from_url(server.url), "hooked")
        hook = receiver({"/hook": [200]})
        for token in ("tok-a-0123456789abcd", "tok-b-0123456789abcd"):
            job = client.post("/v1/jobs", headers=bearer(token), json={
                "operation": "infer", "model": "hooked", "prompt": "x", "webhook_url": hook.url + "/hook"})
            assert client.delete(f"/v1/jobs/{job.get_json()['job_id']}", headers=bearer(token)).status_code == 200
        worker = Background(app, "test")
        worker.tick()
        wait_until(lambda: len(hook.seen) == 2 and worker.idle(), timeout=10, what="both deliveries")
        by_tenant = {json.loads(body)["data"]["id"]: (headers, body) for _, headers, body in hook.seen}
        signed = sorted(((verify(alice_secret, h, b), verify(TenantAPI.WEBHOOK_SECRET, h, b))
                         for h, b in by_tenant.values()))
        assert signed == [(False, True), (True, False)]  # bob's with the global key, alice's with her own only
    finally:
        server.stop()
