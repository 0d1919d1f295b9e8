"""DNS rebinding: with auth off, a Host that is not this machine gets 403, on every route but the probes."""
import ipaddress

import pytest
import requests

from api import create_app, hosts
from tests.conftest import TenantAPI, start_api

EVIL = {"Host": "evil.example:8000", "Origin": "http://evil.example:8000"}
JOB = {"operation": "infer", "model": "no-such-model", "prompt": "x"}


def _refused(resp) -> bool:
    body = resp.json() if callable(getattr(resp, "json", None)) else resp.get_json()
    return resp.status_code == 403 and "INFERQ_ALLOWED_HOSTS" in body["error"]["message"]


def test_host_names_are_read_without_port_brackets_or_case():
    assert hosts.host_name("Evil.Example:8000") == "evil.example"
    assert hosts.host_name("[::1]:8000") == "::1"
    assert hosts.host_name("[::1]") == "::1"
    assert hosts.host_name("localhost.") == "localhost"
    assert hosts.host_name("127.0.0.1") == "127.0.0.1"


@pytest.fixture(scope="module")
def rebinding_api(redis_url, tmp_path_factory):
    api = start_api(redis_url, tmp_path_factory.mktemp("rebind") / "gunicorn.log")
    yield api.url
    api.stop()


def test_a_rebinding_page_is_refused_on_every_route(rebinding_api):
    # The routes the security read reached from a rebinding page, and the page itself.
    for method, path in (("post", "/v1/jobs"), ("get", "/v1/jobs"), ("get", "/rq/"), ("get", "/v1/models"),
                         ("get", "/"), ("get", "/ui/app.js"), ("get", "/metrics"), ("post", "/v1/completions"),
                         ("get", "/v1/files"), ("get", "/v1/narration")):
        resp = requests.request(method, rebinding_api + path, json=JOB, headers=EVIL, timeout=10)
        assert _refused(resp), (method, path, resp.status_code, resp.text[:200])
    err = requests.get(rebinding_api + "/v1/models", headers=EVIL, timeout=10).json()["error"]
    assert err["code"] == "HOST_NOT_ALLOWED"
    # OpenAI's shape on its routes.
    err = requests.post(rebinding_api + "/v1/chat/completions", json={}, headers=EVIL, timeout=10).json()["error"]
    assert err["code"] == "host_not_allowed" and err["type"] == "permission_error"


def test_probes_answer_any_host_and_local_names_pass(rebinding_api):
    for path in ("/health", "/ready"):
        assert requests.get(rebinding_api + path, headers=EVIL, timeout=10).status_code in (200, 503)
    port = rebinding_api.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", "localhost", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert requests.get(rebinding_api + "/v1/models", headers={"Host": host}, timeout=10).status_code == 200, host
    # The bind address itself (127.0.0.1 here) is the common case, and a write with a same-origin Origin passes.
    resp = requests.post(rebinding_api + "/v1/jobs", json=JOB, timeout=10,
                         headers={"Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}"})
    assert resp.json()["error"]["code"] == "MODEL_NOT_FOUND"


def test_allowed_hosts_and_the_wildcard(redis_url):
    named = create_app({"REDIS_URL": redis_url, "TESTING": True, "ALLOWED_HOSTS": "inferq.lan, Evil.Example"})
    c = named.test_client()
    assert c.get("/v1/models", headers={"Host": "inferq.lan:8000"}).status_code == 200
    assert c.get("/v1/models", headers={"Host": "evil.example:8000"}).status_code == 200
    assert _refused(c.get("/v1/models", headers={"Host": "other.example"}))
    off = create_app({"REDIS_URL": redis_url, "TESTING": True, "ALLOWED_HOSTS": "*"}).test_client()
    assert off.get("/v1/models", headers=EVIL).status_code == 200


def test_auth_on_leaves_the_host_alone(redis_url):
    c = create_app({"REDIS_URL": redis_url, "TESTING": True, "API_TOKENS": "alice:" + TenantAPI.ALICE}).test_client()
    assert c.get("/v1/models", headers={**EVIL, "Authorization": "Bearer " + TenantAPI.ALICE}).status_code == 200
    assert c.get("/v1/models", headers=EVIL).status_code == 401


def test_a_wildcard_bind_answers_the_machines_own_addresses(redis_url, tmp_path):
    own = [a for a in hosts.interface_addresses() if not a.is_loopback and not a.is_link_local]
    if not own:
        pytest.skip("this machine has no address besides loopback")
    api = start_api(redis_url, tmp_path / "gunicorn.log", bind="0.0.0.0")
    url = api.url
    try:
        port = url.rsplit(":", 1)[1]
        address = next(a for a in own if a.version == 4) if any(a.version == 4 for a in own) else own[0]
        shown = str(address) if address.version == 4 else f"[{address}]"
        assert requests.get(url + "/v1/models", headers={"Host": f"{shown}:{port}"}, timeout=10).status_code == 200
        assert _refused(requests.get(url + "/v1/models", headers=EVIL, timeout=10))
        assert not ipaddress.ip_address("203.0.113.9") in hosts.interface_addresses()
        assert _refused(requests.get(url + "/v1/models", headers={"Host": f"203.0.113.9:{port}"}, timeout=10))
    finally:
        api.stop()
