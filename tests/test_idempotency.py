"""Idempotency-Key: the same key from the same tenant gives the first job back, never a second run."""
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from inferq.client import Client
from queue_schema import keys
from queue_schema.lifecycle import tenants
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


def test_n_choices_under_one_key_replay_every_choice(tenant_api, r):
    """With n > 1 each choice is a job under a key derived from the request's (choice 0: the key itself)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 5,
            "temperature": 0.9}
    key = uuid.uuid4().hex
    before = submitted(r, "alice")

    def chat(payload=body):
        return requests.post(f"{tenant_api.url}/v1/chat/completions", json=payload, timeout=60,
                             headers={**bearer(tenant_api.ALICE), "Idempotency-Key": key})

    first, again = chat(), chat()
    assert first.status_code == again.status_code == 200, first.text
    job_ids = first.headers["X-Inferq-Job-Id"].split(",")
    assert len(set(job_ids)) == 3 and again.headers["X-Inferq-Job-Id"] == first.headers["X-Inferq-Job-Id"]
    assert again.json() == first.json()  # sampled at 0.9 with random seeds: a rerun would differ
    assert submitted(r, "alice") == before + 3
    digest = __import__("hashlib").sha256(key.encode()).hexdigest()[:32]
    assert r.get(keys.idempotency("alice", digest)).decode().startswith(job_ids[0])
    # The same key with another n is another request: refused, as with one choice.
    other = chat({**body, "n": 2})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    # Streamed again: every choice's chunks from the first jobs, then [DONE].
    streamed = requests.post(f"{tenant_api.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60,
                             headers={**bearer(tenant_api.ALICE), "Idempotency-Key": uuid.uuid4().hex})
    again = requests.post(f"{tenant_api.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60,
                          headers={**bearer(tenant_api.ALICE), "Idempotency-Key": streamed.request.headers[
                              "Idempotency-Key"]})
    assert again.headers["X-Inferq-Job-Id"] == streamed.headers["X-Inferq-Job-Id"]
    for run in (streamed, again):
        assert run.text.rstrip().endswith("data: [DONE]")
    assert submitted(r, "alice") == before + 6


def test_a_refused_choice_cancels_the_others_and_frees_their_keys(client, r):
    """Choice 2 of 3 finds the queue full: the two admitted are cancelled and their keys forgotten,
    so the same key later makes three new jobs (a refusal keeps nothing, as with one job)."""
    from queue_schema.lifecycle.admission import Idempotency
    from tests.helpers import serve_fake_model

    model = "fake-" + uuid.uuid4().hex[:8]
    serve_fake_model(r, model, queue_depth=2)
    key = uuid.uuid4().hex
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 2, "stream": True}
    refused = client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
    assert refused.status_code == 503 and refused.get_json()["error"]["code"] == "queue_full"
    idem = Idempotency.of(key, "")
    assert not any(r.exists(keys.idempotency(tenants.ANONYMOUS, idem.choice(i).digest)) for i in range(3))
    listed = client.get("/v1/jobs", query_string={"model": model}).get_json()["data"]
    assert len(listed) == 2 and {j["state"] for j in listed} == {"cancelled"}
    serve_fake_model(r, model, queue_depth=10)
    resp = client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key}, buffered=False)
    try:
        assert resp.status_code == 200
        job_ids = resp.headers["X-Inferq-Job-Id"].split(",")
        assert len(job_ids) == 3 and not set(job_ids) & {j["job_id"] for j in listed}
        assert all(r.exists(keys.idempotency(tenants.ANONYMOUS, idem.choice(i).digest)) for i in range(3))
    finally:
        resp.close()
    for job_id in job_ids:  # nobody runs this model: a key kept them when the stream closed
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 200


def test_embeddings_answer_again_with_the_same_job(tenant_api, r):
    oai = openai.OpenAI(base_url=f"{tenant_api.url}/v1", api_key=tenant_api.ALICE, max_retries=0, timeout=30)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    before = submitted(r, "alice")
    runs = [oai.embeddings.with_raw_response.create(model="tiny", input=["queue", "worker"], extra_headers=key)
            for _ in range(2)]
    assert runs[0].headers["X-Inferq-Job-Id"] == runs[1].headers["X-Inferq-Job-Id"]
    assert runs[0].parse().model_dump() == runs[1].parse().model_dump()
    assert submitted(r, "alice") == before + 1
