"""Tenants own their jobs; per-tenant limits hold in the admission script; fair share within a priority."""
import time
import uuid

import pytest

from api import create_app
from queue_schema import keys
from queue_schema.events import Narration
from queue_schema.lifecycle import tenants
from queue_schema.lifecycle import views as job_views
from queue_schema.lifecycle.eventlog import EventLog
from queue_schema.lifecycle.leases import Leases
from tests.helpers import bearer, serve_fake_model

ADMIN = "tok-admin-0123456789"


class T:
    """Fresh tenant names per test (limits count in the one session Redis): T.alice, T.ALICE (token)..."""


@pytest.fixture(autouse=True)
def fresh_tenants():
    tag = uuid.uuid4().hex[:6]
    T.alice, T.bob = f"alice-{tag}", f"bob-{tag}"
    T.ALICE, T.BOB = f"tok-alice-{tag}-0123456789", f"tok-bob-{tag}-0123456789"


def fresh_model(r) -> str:
    name = "fake-" + uuid.uuid4().hex[:8]
    serve_fake_model(r, name)
    return name


def make_client(redis_url, **config):
    tokens = f"{T.alice}:{T.ALICE},{T.bob}:{T.BOB}"
    return create_app({"REDIS_URL": redis_url, "TESTING": True, "API_TOKENS": tokens, "ADMIN_TOKENS": ADMIN,
                       **config}).test_client()


def post(client, token, model, **fields):
    return client.post("/v1/jobs", json={"operation": "infer", "model": model, "prompt": "hi", "max_tokens": 2,
                                         **fields}, headers=bearer(token))


def test_another_tenants_job_is_a_404_everywhere(r, redis_url):
    client, model = make_client(redis_url), fresh_model(r)
    job = post(client, T.ALICE, model).get_json()["job_id"]
    assert client.get(f"/v1/jobs/{job}", headers=bearer(T.ALICE)).status_code == 200
    for method, path in (("get", f"/v1/jobs/{job}"), ("get", f"/v1/jobs/{job}/stream"),
                         ("delete", f"/v1/jobs/{job}")):
        resp = getattr(client, method)(path, headers=bearer(T.BOB))
        assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "JOB_NOT_FOUND", (method, path)
        other = uuid.uuid4().hex
        unknown = getattr(client, method)(path.replace(job, other), headers=bearer(T.BOB))
        # Word for word what an unknown id gets: nothing says the job exists.
        assert unknown.get_json()["error"]["message"].replace(other, "ID") == \
            resp.get_json()["error"]["message"].replace(job, "ID")
    assert client.get(f"/v1/jobs/{job}", headers=bearer(ADMIN)).status_code == 200
    assert r.hget(keys.job_info(job), "tenant") == T.alice.encode()
    meta = job_views.view(r, EventLog(r), job)
    assert meta.state == "queued"
    # Bob cannot cancel it; Alice can.
    assert client.delete(f"/v1/jobs/{job}", headers=bearer(T.ALICE)).get_json()["state"] == "cancelled"


def test_listing_is_per_tenant_newest_first_with_filters_and_a_cursor(r, redis_url):
    client, model, other = make_client(redis_url), fresh_model(r), fresh_model(r)
    mine = [post(client, T.ALICE, model).get_json()["job_id"] for _ in range(5)]
    theirs = post(client, T.BOB, model).get_json()["job_id"]
    elsewhere = post(client, T.ALICE, other).get_json()["job_id"]
    client.delete(f"/v1/jobs/{mine[1]}", headers=bearer(T.ALICE))

    def ids(token, **args):
        resp = client.get("/v1/jobs", query_string=args, headers=bearer(token))
        assert resp.status_code == 200, resp.get_json()
        return resp.get_json()

    page = ids(T.ALICE, model=model, limit=2)
    assert [j["job_id"] for j in page["data"]] == mine[::-1][:2] and page["has_more"]
    rest = ids(T.ALICE, model=model, limit=10, cursor=page["next_cursor"])
    assert [j["job_id"] for j in rest["data"]] == mine[::-1][2:] and not rest["has_more"]
    assert rest["next_cursor"] is None
    assert [j["job_id"] for j in ids(T.ALICE, model=model, state="cancelled")["data"]] == [mine[1]]
    assert {j["job_id"] for j in ids(T.ALICE, state="queued", limit=100)["data"]} >= {*mine} - {mine[1]} | {elsewhere}
    assert theirs not in {j["job_id"] for j in ids(T.ALICE, limit=100)["data"]}
    assert [j["job_id"] for j in ids(T.BOB, model=model)["data"]] == [theirs]
    everyone = {j["job_id"] for j in ids(ADMIN, model=model, limit=100)["data"]}
    assert everyone == {*mine, theirs}
    assert [j["job_id"] for j in ids(ADMIN, model=model, tenant=T.bob)["data"]] == [theirs]
    # float() reads nan and inf, which Redis refuses as scores: they are bad cursors, not a 500.
    for bad in ({"state": "nope"}, {"limit": 0}, {"limit": "x"}, {"cursor": "garbage"}, {"cursor": "nan_x"},
                {"cursor": "inf_x"}, {"cursor": "-Infinity_x"}):
        resp = client.get("/v1/jobs", query_string=bad, headers=bearer(T.ALICE))
        assert resp.status_code == 422 and resp.get_json()["error"]["code"] == "INVALID_REQUEST", bad


def test_submits_per_second_are_a_token_bucket_per_tenant(r, redis_url):
    client, model = make_client(redis_url, SUBMITS_PER_S=1, SUBMIT_BURST=2), fresh_model(r)
    assert [post(client, T.ALICE, model).status_code for _ in range(2)] == [202, 202]
    refused = post(client, T.ALICE, model)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "RATE_LIMITED"
    assert refused.headers["Retry-After"] == "1"
    assert post(client, T.BOB, model).status_code == 202  # Bob's bucket is his own
    time.sleep(1.05)
    assert post(client, T.ALICE, model).status_code == 202


def test_queued_and_running_limits_follow_the_jobs_own_moves(r, redis_url):
    client = make_client(redis_url, MAX_QUEUED_PER_TENANT=2, MAX_RUNNING_PER_TENANT=1)
    model = fresh_model(r)
    a, b = (post(client, T.ALICE, model).get_json()["job_id"] for _ in range(2))
    full = post(client, T.ALICE, model)
    assert full.status_code == 429 and full.get_json()["error"]["code"] == "TOO_MANY_QUEUED"
    assert int(full.headers["Retry-After"]) > 0
    assert post(client, T.BOB, model).status_code == 202
    # A cancel frees a queued place (the terminal append leaves the queued set).
    client.delete(f"/v1/jobs/{b}", headers=bearer(T.ALICE))
    assert r.smembers(keys.limit_queued(T.alice)) == {a.encode()}
    c = post(client, T.ALICE, model).get_json()["job_id"]
    # A worker takes one: it moves from queued to running in the lease script.
    taken = Leases(r).acquire("w-test", "w-test", [keys.queue_name(model, "normal")], 1, int(time.time() * 1000),
                              "2026-01-01T00:00:00.000000Z")
    assert [t.job_id for t in taken] == [a] and taken[0].owner == "w-test#2"  # its queued event is #1
    assert r.smembers(keys.limit_running(T.alice)) == {a.encode()}
    assert r.smembers(keys.limit_queued(T.alice)) == {c.encode()}
    busy = post(client, T.ALICE, model)
    assert busy.status_code == 429 and busy.get_json()["error"]["code"] == "TOO_MANY_RUNNING"
    # Its end (written by the lease owner, then settled) leaves the running set.
    from queue_schema.events import End
    from queue_schema.lifecycle.ending import Ending

    assert Ending(r, EventLog(r)).end(End(job_id=a, seq=1, tokens_out=0, decode_time_ms=0, stop_reason="eos",
                                          text=""), taken[0].owner) == 1
    assert not r.exists(keys.job_lease(a))
    assert not r.smembers(keys.limit_running(T.alice))
    assert post(client, T.ALICE, model).status_code == 202
    counts = tenants.counts(r)
    assert counts[T.alice] == (2, 0) and counts[T.bob] == (1, 0)


def test_openai_routes_answer_429_in_openai_shape(r, redis_url):
    client, model = make_client(redis_url, SUBMITS_PER_S=0.5, SUBMIT_BURST=1), fresh_model(r)
    body = {"model": model, "prompt": "hi", "max_tokens": 1}
    assert post(client, T.ALICE, model).status_code == 202
    resp = client.post("/v1/completions", json=body, headers=bearer(T.ALICE))
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "2"
    assert resp.get_json()["error"] == {"message": resp.get_json()["error"]["message"], "type": "rate_limit_error",
                                        "code": "rate_limited", "param": None}


def test_metrics_by_tenant(r, redis_url):
    client, model = make_client(redis_url), fresh_model(r)
    job = post(client, T.BOB, model).get_json()["job_id"]
    post(client, T.BOB, model)
    client.delete(f"/v1/jobs/{job}", headers=bearer(T.BOB))
    text = client.get("/metrics").get_data(as_text=True)
    counters = tenants.read_counters(r)
    assert f'inferq_tenant_jobs_submitted_total{{tenant="{T.bob}"}} {float(counters["submitted"][T.bob])}' in text
    assert f'inferq_tenant_jobs_cancelled_total{{tenant="{T.bob}"}} {float(counters["cancelled"][T.bob])}' in text
    assert f'inferq_tenant_jobs_queued{{tenant="{T.bob}"}} 1.0' in text


def test_tenants_take_turns_within_a_priority(r, redis_url):
    """Round robin over the tenants with jobs waiting: A's backlog does not hold B or C back."""
    client, model = make_client(redis_url), fresh_model(r)
    owner = {}
    for token, name, n in ((T.ALICE, "a", 5), (T.BOB, "b", 2), (ADMIN, "admin", 1)):
        for _ in range(n):
            owner[post(client, token, model).get_json()["job_id"]] = name
    high = post(client, T.BOB, model, priority="high").get_json()["job_id"]
    owner[high] = "b-high"
    assert r.lrange(keys.queue_ring(keys.queue_name(model, "normal")), 0, -1) == [
        keys.queue_name(model, "normal", t).encode() for t in (T.alice, T.bob, "admin")]
    # The queued event's position is the fair-share estimate: B's second job has one of each ahead...
    second_b = [j for j, o in owner.items() if o == "b"][1]
    assert client.get(f"/v1/jobs/{second_b}", headers=bearer(T.BOB)).get_json()["position"] == 1 + 1 + 2 + 1
    order, held = [], []
    queues = [keys.queue_name(model, p) for p in keys.PRIORITIES]
    while taken := Leases(r).acquire("w", "w", queues, 1, int(time.time() * 1000), "2026-01-01T00:00:00.000000Z"):
        order.append(owner[taken[0].job_id])
        held.append(taken[0].job_id)
    assert order == ["b-high", "a", "b", "admin", "a", "b", "a", "a", "a"]
    assert not r.exists(keys.queue_ring(keys.queue_name(model, "normal")))
    # Taking several at once takes turns too.
    for token in (T.ALICE, T.ALICE, T.ALICE, T.BOB):
        owner[post(client, token, model).get_json()["job_id"]] = token
    taken = Leases(r).acquire("w", "w", queues, 3, int(time.time() * 1000), "2026-01-01T00:00:00.000000Z")
    assert [owner[t.job_id] for t in taken] == [T.ALICE, T.BOB, T.ALICE]
    end_all(r, held + [t.job_id for t in taken], "w")


def end_all(r, job_ids, owner):
    """End jobs a test leased, as their owner: no lease is left for a reaper to find."""
    from queue_schema.events import End
    from queue_schema.lifecycle.ending import Ending

    log = EventLog(r)
    for job_id in job_ids:
        Ending(r, log).end(End(job_id=job_id, seq=log.next_seq(job_id), tokens_out=0, decode_time_ms=0,
                               stop_reason="eos", text=""), owner)


def test_with_tenants_rq_dashboard_is_for_admins_only(redis_url):
    """rq-dashboard shows every tenant's prompts and can empty their queues. With admins configured a
    tenant's token is refused; with tenants and none configured it is refused too (alice got 200 before),
    with a 403 that says how to open it. One tenant alone still opens it: nobody else's data is there."""
    client = make_client(redis_url)
    assert client.get("/rq/", headers=bearer(T.ALICE)).status_code == 401
    assert client.get("/rq/", headers=bearer(ADMIN)).status_code == 200
    alone = create_app({"REDIS_URL": redis_url, "TESTING": True, "API_TOKENS": f"{T.alice}:{T.ALICE}"})
    assert alone.test_client().get("/rq/", headers=bearer(T.ALICE)).status_code == 200
    no_admins = create_app({"REDIS_URL": redis_url, "TESTING": True,
                            "API_TOKENS": f"{T.alice}:{T.ALICE},{T.bob}:{T.BOB}"})
    for path in ("/rq/", "/rq/0/data/queues.json"):
        resp = no_admins.test_client().get(path, headers=bearer(T.ALICE))
        err = resp.get_json()["error"]
        assert resp.status_code == 403 and err["code"] == "ADMIN_ONLY" and "INFERQ_ADMIN_TOKENS" in err["message"]


def test_embed_jobs_go_through_the_same_admission_tenants_limits_and_capabilities(r, redis_url):
    """One admission path for both operations: an embed job is the tenant's, on its own queue, counted
    by its limits; the capability check holds alongside them."""
    client = make_client(redis_url, MAX_QUEUED_PER_TENANT=1)
    model = "fake-" + uuid.uuid4().hex[:8]
    serve_fake_model(r, model, capabilities=("embeddings",))
    embed = {"operation": "embed", "model": model, "input": ["a", "b"]}
    first = client.post("/v1/jobs", json=embed, headers=bearer(T.ALICE))
    assert first.status_code == 202, first.get_json()
    job = first.get_json()["job_id"]
    assert r.hget(keys.job_info(job), "tenant") == T.alice.encode()
    assert r.lrange(keys.rq_queue(keys.queue_name(model, "normal", T.alice)), 0, -1) == [job.encode()]
    assert client.get(f"/v1/jobs/{job}", headers=bearer(T.BOB)).status_code == 404
    listed = client.get("/v1/jobs", query_string={"model": model}, headers=bearer(T.ALICE)).get_json()
    assert [j["job_id"] for j in listed["data"]] == [job]
    again = client.post("/v1/jobs", json=embed, headers=bearer(T.ALICE))
    assert again.status_code == 429 and again.get_json()["error"]["code"] == "TOO_MANY_QUEUED"
    # What the model cannot do is refused as such, whatever the tenant's limits say.
    grammar = client.post("/v1/jobs", json={"operation": "infer", "model": model, "prompt": "hi",
                                            "grammar": 'root ::= "x"'}, headers=bearer(T.ALICE))
    assert grammar.status_code == 400 and grammar.get_json()["error"]["code"] == "UNSUPPORTED_FEATURE"
    assert client.post("/v1/jobs", json=embed, headers=bearer(T.BOB)).status_code == 202  # Bob's own limit
    # An Idempotency-Key replays an embed job too.
    key = {"Idempotency-Key": uuid.uuid4().hex}
    bobs = [client.post("/v1/jobs", json={**embed, "input": "c"}, headers={**bearer(T.BOB), **key}) for _ in range(2)]
    assert bobs[0].status_code == 429  # Bob has one queued already: nothing was admitted, nothing kept
    assert client.delete(f"/v1/jobs/{job}", headers=bearer(T.ALICE)).get_json()["state"] == "cancelled"
    replays = [client.post("/v1/jobs", json=embed, headers={**bearer(T.ALICE), **key}) for _ in range(2)]
    assert [x.status_code for x in replays] == [202, 202]
    assert replays[0].get_json()["job_id"] == replays[1].get_json()["job_id"]


def test_narration_and_workers_show_a_tenant_only_its_own_jobs(r, redis_url):
    """The narration feed and /v1/workers name jobs: another tenant's stay out of them (admins see all)."""
    from queue_schema.lifecycle import registry

    client, model = make_client(redis_url), fresh_model(r)
    alices = post(client, T.ALICE, model).get_json()["job_id"]
    bobs = post(client, T.BOB, model).get_json()["job_id"]
    for job in (alices, bobs):  # as a worker narrates a job: into its log and the feed
        assert EventLog(r).append(Narration(job_id=job, seq=1, actor="w", action="start", target=job,
                                            human=f"Worker w started job {job}")).name == "OK"

    def narrated(token):
        resp = client.get("/v1/narration?backlog=1000&follow=false", headers=bearer(token))
        assert resp.status_code == 200
        return resp.get_data(as_text=True)

    for token, sees, hidden in ((T.ALICE, alices, bobs), (T.BOB, bobs, alices)):
        feed = narrated(token)
        assert sees in feed and hidden not in feed, token
    assert alices in narrated(ADMIN) and bobs in narrated(ADMIN)

    worker = registry.WorkerInfo(id=f"w-{model}", host="test", pid=0, model=model, backend="none", state="busy",
                                 slots=2, jobs=[alices, bobs], current_job=alices)
    registry.publish_heartbeat(r, worker, registry.ModelInfo(name=model, context_length=512, queue_depth=1000,
                                                             backend="none", slots=2))

    def shown(token):
        listed = client.get("/v1/workers", headers=bearer(token)).get_json()["workers"]
        return next(w for w in listed if w["id"] == worker.id)

    assert shown(T.ALICE)["jobs"] == [alices] and shown(T.ALICE)["current_job"] == alices
    assert shown(T.BOB)["jobs"] == [bobs] and shown(T.BOB)["current_job"] is None
    assert shown(ADMIN)["jobs"] == [alices, bobs]


def test_the_live_narration_feed_leaves_out_other_tenants_jobs(r, tenant_api):
    """Followed live (pub/sub, through gunicorn): each tenant reads its own job's narration and a worker's,
    never another tenant's job."""
    import threading

    import requests

    from tests.conftest import TenantAPI

    model = fresh_model(r)
    ids = {}
    for name, token in (("alice", TenantAPI.ALICE), ("bob", TenantAPI.BOB)):
        resp = requests.post(f"{tenant_api.url}/v1/jobs", headers=bearer(token), timeout=10,
                             json={"operation": "infer", "model": model, "prompt": "hi", "max_tokens": 2})
        assert resp.status_code == 202, resp.text
        ids[name] = resp.json()["job_id"]
    sentinel = f"model {model} loaded, {uuid.uuid4().hex}"
    read, ready = {}, threading.Barrier(3, timeout=20)

    def follow(name, token):
        with requests.get(f"{tenant_api.url}/v1/narration?backlog=0", headers=bearer(token), stream=True,
                          timeout=(5, 20)) as resp:
            ready.wait()
            text = ""
            for chunk in resp.iter_content(chunk_size=None, decode_unicode=True):
                text += chunk
                if sentinel in text:
                    break
            read[name] = text

    threads = [threading.Thread(target=follow, args=a) for a in (("alice", TenantAPI.ALICE),
                                                                  ("bob", TenantAPI.BOB))]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.5)  # both subscribed
    log = EventLog(r)
    for job in ids.values():
        log.append(Narration(job_id=job, seq=1, actor="w", action="start", target=job, human=f"started {job}"))
    log.append(Narration(actor="w", action="loaded", target="w", human=sentinel))
    for t in threads:
        t.join(25)
    assert ids["alice"] in read["alice"] and ids["bob"] not in read["alice"]
    assert ids["bob"] in read["bob"] and ids["alice"] not in read["bob"]
