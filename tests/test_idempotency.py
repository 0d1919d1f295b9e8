"""Idempotency-Key: the same key from the same tenant gives the first job back, never a second run."""
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from queue_schema import keys, tenants
from inferq.client import Client
from tests.helpers import bearer

pytestmark = pytest.mark.usefixtures("tiny_worker")
BODY = {"operation": "infer", "model": "tiny", "prompt": "def data", "max_tokens": 4, "temperature": 0}


def submitted(r, tenant):
    return tenants.read_counters(r).get("submitted", {}).get(tenant, 0)


def post(api, token, key, body=BODY):
    return requests.post(f"{api.url}/v1/jobs", json=body, headers={**bearer(token), "Idempotency-Key": key},
                         timeout=30)


def test_same_key_same_tenant_is_the_same_job_and_another_tenant_gets_its_own(tenant_api, r):
    key = uuid.uuid4().hex
    first = post(tenant_api, tenant_api.ALICE, key)
    again = post(tenant_api, tenant_api.ALICE, key)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json() and first.headers["Location"] == again.headers["Location"]
    bobs = post(tenant_api, tenant_api.BOB, key)
    assert bobs.status_code == 202 and bobs.json()["job_id"] != first.json()["job_id"]
    # The same key with another request is refused: it would otherwise answer with the wrong job.
    other = post(tenant_api, tenant_api.ALICE, key, {**BODY, "prompt": "something else"})
    assert other.status_code == 422 and other.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    # Without a key, the same request is a new job.
    plain = requests.post(f"{tenant_api.url}/v1/jobs", json=BODY, headers=bearer(tenant_api.ALICE), timeout=30)
    assert plain.json()["job_id"] != first.json()["job_id"]
    bad = post(tenant_api, tenant_api.ALICE, "x" * 300)
    assert bad.status_code == 422 and bad.json()["error"]["errors"][0]["field"] == "Idempotency-Key"


def test_concurrent_requests_with_one_key_make_one_job(tenant_api, r):
    key = uuid.uuid4().hex
    before = submitted(r, "alice")
    start = threading.Barrier(16)

    def one(_):
        start.wait()
        return post(tenant_api, tenant_api.ALICE, key)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["job_id"] for a in answers}) == 1
    assert submitted(r, "alice") == before + 1
    job = answers[0].json()["job_id"]
    assert r.get(keys.idempotency("alice", __import__("hashlib").sha256(key.encode()).hexdigest()[:32])) \
        .decode().startswith(job)


def test_openai_routes_answer_again_with_the_same_response(tenant_api, r):
    oai = openai.OpenAI(base_url=f"{tenant_api.url}/v1", api_key=tenant_api.ALICE, max_retries=0, timeout=30)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    before = submitted(r, "alice")
    first = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                        temperature=0.9, seed=-1, extra_headers=key)
    again = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                        temperature=0.9, seed=-1, extra_headers=key)
    assert again.model_dump() == first.model_dump()  # sampled at 0.9 with a random seed: a rerun would differ
    assert submitted(r, "alice") == before + 1
    # Streamed: the second request streams the first one's job, from its first token.
    skey = {"Idempotency-Key": uuid.uuid4().hex}
    chunks = [list(oai.completions.create(model="tiny", prompt="def data", max_tokens=8, temperature=0.9,
                                          stream=True, extra_headers=skey)) for _ in range(2)]
    assert {c.id for run in chunks for c in run} == {chunks[0][0].id}
    texts = ["".join(c.choices[0].text for c in run if c.choices) for run in chunks]
    assert texts[0] == texts[1] and submitted(r, "alice") == before + 2
    job = chunks[0][0].id.removeprefix("cmpl-")
    assert [e["type"] for e in events_of(tenant_api, job)].count("started") == 1


def events_of(api, job_id):
    return list(Client(api.url, token=api.ALICE).events(job_id))
