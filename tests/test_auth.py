"""Bearer-token auth: on when INFERQ_API_TOKENS is set, off otherwise."""
import pytest

from api import create_app
from tests.helpers import events


@pytest.fixture()
def secured(redis_url):
    return create_app({"REDIS_URL": redis_url, "API_TOKENS": "s3cret, other-token", "TESTING": True}).test_client()


def infer():
    return {"operation": "infer", "model": "tiny", "prompt": "hi", "max_tokens": 2}


@pytest.mark.usefixtures("tiny_worker")
def test_auth_on(secured):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        resp = secured.post("/v1/jobs", json=infer(), headers=headers)
        assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "UNAUTHORIZED"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert secured.get("/v1/models").status_code == 401
    # open routes
    assert secured.get("/health").status_code == 200
    assert secured.get("/ready").status_code == 200
    ok = secured.post("/v1/jobs", json=infer(), headers={"Authorization": "Bearer other-token"})
    assert ok.status_code == 202
    job = ok.get_json()["job_id"]
    # EventSource cannot set headers: ?access_token= works on stream routes only.
    assert secured.get(f"/v1/jobs/{job}/stream").status_code == 401
    assert secured.get(f"/v1/jobs/{job}/stream?access_token=nope").status_code == 401
    resp = secured.get(f"/v1/jobs/{job}/stream?access_token=s3cret", buffered=True)
    assert resp.status_code == 200 and b"event: end" in resp.data
    assert secured.get(f"/v1/jobs/{job}?access_token=s3cret").status_code == 401
    assert secured.get(f"/v1/jobs/{job}", headers={"Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.usefixtures("tiny_worker")
def test_auth_off(client):
    resp = client.post("/v1/jobs", json=infer())
    assert resp.status_code == 202
    assert events(client, resp.get_json()["job_id"])[-1]["type"] == "end"


@pytest.mark.parametrize("raw", ["0", "false", "null", "[]", "true", '["a"]'])
def test_tokens_are_read_as_written_never_as_json(monkeypatch, redis_url, raw):
    """Each of these once turned auth off (or became the token "True"): now each is a token."""
    monkeypatch.setenv("INFERQ_API_TOKENS", raw)
    c = create_app({"REDIS_URL": redis_url, "TESTING": True}).test_client()
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {raw}"}).status_code == 200
    if raw == "true":
        assert c.get("/v1/models", headers={"Authorization": "Bearer True"}).status_code == 401


@pytest.mark.parametrize("raw,needle", [
    ("", "holds no token"), (" , ,", "holds no token"), (":tok-0123456789abcdef", "not a tenant name"),
    ("team a:tok-0123456789abcdef", "not a tenant name"), ("alice:", "no token"),
    ("alice:same-token-0123456789,bob:same-token-0123456789", "two tenants"),
])
def test_a_set_variable_without_a_usable_token_stops_the_api(monkeypatch, redis_url, raw, needle):
    from queue_schema.errors import ConfigError

    monkeypatch.setenv("INFERQ_API_TOKENS", raw)
    with pytest.raises(ConfigError) as info:
        create_app({"REDIS_URL": redis_url, "TESTING": True})
    message = str(info.value)
    assert needle in message and "\n" not in message and message.startswith("INFERQ_API_TOKENS")
    assert "same-token" not in message  # never the secret itself


@pytest.fixture()
def tenants(redis_url):
    from flask import jsonify

    from api import auth

    app = create_app({"REDIS_URL": redis_url, "TESTING": True, "HIGH_PRIORITY_TENANTS": "alice",
                      "API_TOKENS": "alice:tok-alice-0123456789, bob:tok-bob-0123456789,shared-tok-0123456789"})
    app.add_url_rule("/whoami", "whoami", lambda: jsonify(vars(auth.principal())))
    return app.test_client()


def test_principals_name_the_tenant_and_a_stable_limit_key(tenants):
    import hashlib

    def who(token, **kw):
        return tenants.get("/whoami", headers={"Authorization": f"Bearer {token}"}, **kw).get_json()

    assert who("tok-alice-0123456789") == {"name": "alice", "limit_key": "alice", "admin": False}
    assert who("tok-bob-0123456789") == {"name": "bob", "limit_key": "bob", "admin": False}
    shared = who("shared-tok-0123456789")
    assert shared == {"name": "default", "admin": False,
                      "limit_key": "token:" + hashlib.sha256(b"shared-tok-0123456789").hexdigest()[:16]}
    assert "shared-tok" not in shared["limit_key"]
    assert tenants.get("/whoami").status_code == 401


def test_principal_with_auth_off_is_the_client_address(redis_url):
    from flask import jsonify

    from api import auth

    app = create_app({"REDIS_URL": redis_url, "TESTING": True})
    app.add_url_rule("/whoami", "whoami", lambda: jsonify(vars(auth.principal())))
    got = app.test_client().get("/whoami", environ_base={"REMOTE_ADDR": "192.0.2.7"}).get_json()
    assert got == {"name": "anonymous", "limit_key": "addr:192.0.2.7", "admin": False}


def test_high_priority_is_for_the_listed_tenants_only(tenants, monkeypatch, redis_url):
    def submit(token, priority):
        body = {**infer(), "model": "no-such-model", "priority": priority}
        return tenants.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {token}"})

    # Past the check, the unknown model is the answer.
    assert submit("tok-alice-0123456789", "high").get_json()["error"]["code"] == "MODEL_NOT_FOUND"
    for token in ("tok-bob-0123456789", "shared-tok-0123456789"):
        resp = submit(token, "high")
        assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "PRIORITY_NOT_ALLOWED"
        assert submit(token, "normal").get_json()["error"]["code"] == "MODEL_NOT_FOUND"
    # Unset: everyone may; set from the environment, it is a plain list too.
    open_app = create_app({"REDIS_URL": redis_url, "TESTING": True}).test_client()
    body = {**infer(), "model": "no-such-model", "priority": "high"}
    assert open_app.post("/v1/jobs", json=body).status_code == 404
    monkeypatch.setenv("INFERQ_HIGH_PRIORITY_TENANTS", "ops,anonymous")
    assert create_app({"REDIS_URL": redis_url, "TESTING": True}).test_client().post(
        "/v1/jobs", json=body).status_code == 404
    monkeypatch.setenv("INFERQ_HIGH_PRIORITY_TENANTS", "ops")
    assert create_app({"REDIS_URL": redis_url, "TESTING": True}).test_client().post(
        "/v1/jobs", json=body).status_code == 403
