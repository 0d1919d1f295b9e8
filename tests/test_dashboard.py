"""rq-dashboard at /rq: job data cannot run script in it, and nothing in Redis is ever unpickled.

Jobs are written straight into Redis with RQ (a queue named like inferq's, no
worker serving it), as a hostile or foreign producer would.
"""
import os
import pathlib
import pickle
import re
import uuid

import pytest
from rq import Queue, Worker
from rq.job import Job
from rq.results import Result
from rq.serializers import JSONSerializer

from tests.conftest import CHROMIUM

IMG = '<img src=x onerror="window.__xss=1">'
SCRIPT = "<script>window.__xss=2</script>"
PAYLOAD = f"{IMG} {SCRIPT}"


def hostile_job(r) -> tuple[Job, str]:
    """A queued job whose description, meta and result all carry HTML that would run script."""
    queue = Queue(f"inferq.xss-{uuid.uuid4().hex[:8]}.normal", connection=r, serializer=JSONSerializer)
    job = queue.enqueue("worker.infer_job.run_infer", kwargs={"payload": {"prompt": PAYLOAD}},
                        description=f"infer {PAYLOAD}", meta={"note": PAYLOAD, PAYLOAD: "as a key"})
    Result.create(job, Result.Type.SUCCESSFUL, ttl=600,
                  return_value={"text": PAYLOAD, "metadata": {"user": PAYLOAD, PAYLOAD: 1}})
    return job, queue.name


def test_dashboard_pages_get_a_nonce_csp_and_its_json_is_escaped(client, r):
    job, queue = hostile_job(r)
    nonces = []
    for path in (f"/rq/0/view/job/{job.id}", f"/rq/0/view/jobs/{queue}/queued/8/asc/1", "/rq/0/view/workers",
                 "/rq/"):
        resp = client.get(path)
        assert resp.status_code == 200, path
        csp = resp.headers["Content-Security-Policy"]
        script_src = next(d for d in csp.split(";") if d.strip().startswith("script-src"))
        assert "'unsafe-inline'" not in script_src and "'strict-dynamic'" not in script_src
        assert "frame-ancestors 'none'" in csp and resp.headers["X-Frame-Options"] == "DENY"
        nonce = re.search(r"'nonce-([^']+)'", script_src).group(1)
        html = resp.get_data(as_text=True)
        # Every executable inline block carries this response's nonce; the library's files need none.
        inline = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html)
        assert inline and all(f'nonce="{nonce}"' in tag for tag in inline), inline
        assert not re.search(r"<[^>]+\son[a-z]+\s*=", html)  # no inline event handlers to allow
        nonces.append(nonce)
    assert len(set(nonces)) == len(nonces)  # per response
    info = client.get(f"/rq/0/data/job/{job.id}.json").get_json()
    assert info["result"]["text"] == PAYLOAD.replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    assert "<" not in str(info) and "&lt;img" in info["metadata"] and "&lt;script&gt;" in info["description"]
    listed = client.get(f"/rq/0/data/jobs/{queue}/queued/8/asc/1.json").get_json()["jobs"]
    assert [j["id"] for j in listed] == [job.id] and "<" not in listed[0]["description"]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed (make test installs it)")
def test_hostile_job_data_runs_no_script_and_the_dashboard_still_shows_it(live_api, r, browser):
    job, queue = hostile_job(r)
    page = browser.new_page()
    try:
        page.goto(f"{live_api}/rq/0/view/job/{job.id}")
        # The page's own inline script ran (it fetches and renders the job): the nonce works.
        page.wait_for_function("document.querySelector('#job-data').textContent.includes('window.__xss=1')",
                               timeout=15000)
        text = page.inner_text("#job-data")
        assert IMG in text and SCRIPT in text  # shown as text, not markup
        page.wait_for_timeout(500)  # an <img onerror> fires as soon as the image fails
        assert page.evaluate("typeof window.__xss") == "undefined"

        # The CSP itself, beneath the escaping: markup that does reach the DOM runs no handler.
        page.evaluate("""() => {
            window.__violations = [];
            document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(e.violatedDirective));
            document.body.insertAdjacentHTML('beforeend', '<img src="x-missing" onerror="window.__csp=1">');
        }""")
        page.wait_for_function("window.__violations.length > 0", timeout=10000)
        assert page.evaluate("typeof window.__csp") == "undefined"
        assert any(d.startswith("script-src") for d in page.evaluate("window.__violations"))

        page.goto(f"{live_api}/rq/0/view/jobs/{queue}/queued/8/asc/1")
        page.wait_for_selector(f"tr[data-job-id='{job.id}']", timeout=15000)
        page.wait_for_timeout(500)
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert "window.__xss=1" in page.inner_text(f"tr[data-job-id='{job.id}']")
    finally:
        page.close()


class Pickle:
    """A real pickle serializer (RQ's own names for it are JSON once the API is loaded)."""

    dumps = staticmethod(pickle.dumps)
    loads = staticmethod(pickle.loads)


class Touch:
    """Unpickling this creates ``path``: proof that something unpickled it."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def test_pickled_job_data_is_never_unpickled_and_no_view_answers_500(client, r, tmp_path):
    marker = tmp_path / "unpickled"
    queue = Queue(f"inferq.pickled-{uuid.uuid4().hex[:8]}.normal", connection=r, serializer=Pickle)
    job = queue.enqueue("builtins.print", Touch(marker), description="a pickled job", meta={"m": Touch(marker)})
    Result.create(job, Result.Type.SUCCESSFUL, ttl=600, return_value=Touch(marker))
    worker = Worker([queue], connection=r, serializer=Pickle, name=f"pickled-{uuid.uuid4().hex[:8]}")
    worker.register_birth()
    worker.prepare_execution(job)  # busy with the pickled job, as Worker.all() will read it
    try:
        assert not marker.exists()  # pickling alone touches nothing
        answers = {path: client.get(path) for path in (
            f"/rq/0/view/job/{job.id}", f"/rq/0/data/job/{job.id}.json",
            f"/rq/0/view/jobs/{queue.name}/queued/8/asc/1", f"/rq/0/data/jobs/{queue.name}/queued/8/asc/1.json",
            "/rq/0/data/queues.json", "/rq/0/view/workers", "/rq/0/data/workers.json")}
        assert not marker.exists(), "something in the API unpickled job data"
        assert {p: a.status_code for p, a in answers.items()} == {
            **{p: 200 for p in answers}, "/rq/0/data/workers.json": 409}
        # Undecodable parts show as a marker; the job itself is still listed and viewable.
        info = answers[f"/rq/0/data/job/{job.id}.json"].get_json()
        assert "not JSON" in str(info["result"]) and "not JSON" in info["metadata"]
        assert answers[f"/rq/0/data/jobs/{queue.name}/queued/8/asc/1.json"].get_json()["jobs"][0]["id"] == job.id
        # The one thing that needs the job's call (a worker's current job) is refused, not crashed.
        assert answers["/rq/0/data/workers.json"].get_json()["error"]["code"] == "JOB_UNREADABLE"
    finally:
        worker.register_death()
        r.delete(worker.executions_key)
    assert client.get("/rq/0/data/workers.json").status_code == 200
    assert not marker.exists()


def test_workers_view_reads_a_busy_inferq_worker(client, slow_worker):
    """RQ's Worker objects default to pickle: a JSON job on a busy worker used to make this a 500."""
    from tests.helpers import events, submit

    job = submit(client, model="slow", prompt="busy", max_tokens=2000, temperature=0)
    events(client, job, until="token")
    try:
        resp = client.get("/rq/0/data/workers.json")
        assert resp.status_code == 200
        current = [w["current_job"] for w in resp.get_json()["workers"] if w["current_job"] != "idle"]
        assert any(c["job_id"] == job and "run_infer" in c["call_string"] for c in current), current
    finally:
        client.delete(f"/v1/jobs/{job}")
        events(client, job)


def test_rqs_default_serializer_in_the_api_process_is_json(app, r):
    import rq.serializers

    for serializer in (rq.serializers.resolve_serializer(None), rq.serializers.resolve_serializer("pickle"),
                       Queue("any", connection=r).serializer, Worker(["any"], connection=r).serializer):
        assert serializer.dumps({"a": 1}) == b'{"a": 1}'
        assert serializer.loads(pickle.dumps(Touch(pathlib.Path("/nonexistent/x")))) == {
            "unreadable": "not JSON (inferq never unpickles)"}


def test_dashboard_write_actions_are_post_only_and_same_origin(client, r):
    job, queue = hostile_job(r)
    resp = client.get(f"/rq/requeue/{queue}")  # rq-dashboard itself takes GET here
    assert resp.status_code == 405 and resp.get_json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    for path in (f"/rq/job/{job.id}/delete", f"/rq/job/{job.id}/requeue", f"/rq/queue/{queue}/queued/empty",
                 f"/rq/queue/{queue}/compact"):
        assert client.get(path).status_code == 405, path
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Referer": "https://evil.example/page"}):
            resp = client.post(path, headers=headers)
            assert resp.status_code == 403, (path, headers)
            assert resp.get_json()["error"]["code"] == "FORBIDDEN_ORIGIN"
    assert Job.exists(job.id, connection=r)  # nothing above touched it
    resp = client.post(f"/rq/job/{job.id}/delete", headers={"Origin": "http://localhost"})
    assert resp.status_code == 200 and resp.get_json()["status"] == "OK"
    assert not Job.exists(job.id, connection=r)


def test_unknown_job_and_instance_are_404_not_500(client):
    assert client.get("/rq/0/view/job/nosuchjob").status_code == 404
    resp = client.get("/rq/0/data/job/nosuchjob.json")
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "JOB_NOT_FOUND"
    assert client.get("/rq/7/view/queues").status_code == 404
