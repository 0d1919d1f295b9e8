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
