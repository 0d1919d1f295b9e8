"""Another site's page cannot use a browser against the API: same-origin writes, JSON-only bodies, headers."""
import http.server
import os
import threading
import time

import pytest
import requests

from api import create_app
from tests.conftest import CHROMIUM

JOB = {"operation": "infer", "model": "no-such-model", "prompt": "x"}
OPENAI = {"model": "no-such-model", "prompt": "x"}
CROSS_SITE = [{"Origin": "https://evil.example"}, {"Origin": "null"}, {"Origin": "http://localhost.evil.example"},
              {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
              {"Referer": "https://evil.example/page"}]
SAME_SITE = [{}, {"Origin": "http://localhost"}, {"Origin": "https://localhost"}, {"Sec-Fetch-Site": "same-origin"},
             {"Sec-Fetch-Site": "none"}, {"Referer": "http://localhost/"}]


@pytest.mark.parametrize("headers", CROSS_SITE)
def test_cross_site_writes_are_403_in_each_routes_shape(client, headers):
    resp = client.post("/v1/jobs", json=JOB, headers=headers)
    assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "FORBIDDEN_ORIGIN"
    assert client.delete("/v1/jobs/abc", headers=headers).status_code == 403
    for path in ("/v1/completions", "/v1/chat/completions"):
        resp = client.post(path, json=OPENAI, headers=headers)
        err = resp.get_json()["error"]
        assert resp.status_code == 403 and err["code"] == "forbidden_origin" and err["type"] == "permission_error"
        assert set(err) == {"message", "type", "code", "param"}


@pytest.mark.parametrize("headers", SAME_SITE)
def test_same_origin_and_non_browser_writes_go_through(client, headers):
    # Past the checks: the unknown model is the answer.
    assert client.post("/v1/jobs", json=JOB, headers=headers).get_json()["error"]["code"] == "MODEL_NOT_FOUND"
    assert client.delete("/v1/jobs/abc", headers=headers).status_code == 404


def test_reads_are_not_origin_checked(client):
    assert client.get("/v1/models", headers={"Origin": "https://evil.example"}).status_code == 200


def test_trusted_origins_are_allowed(redis_url):
    c = create_app({"REDIS_URL": redis_url, "TESTING": True,
                    "TRUSTED_ORIGINS": "https://inferq.example.com, http://10.0.0.5:8000"}).test_client()
    for origin, status in (("https://inferq.example.com", 404), ("http://10.0.0.5:8000", 404),
                           ("http://inferq.example.com", 403), ("https://evil.example", 403)):
        assert c.post("/v1/jobs", json=JOB, headers={"Origin": origin}).status_code == status, origin


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_json_routes_take_json_only(client, content_type):
    import json

    body = json.dumps(JOB)
    kw = {"data": body} if content_type is None else {"data": body, "content_type": content_type}
    for path, shape in (("/v1/jobs", "inferq"), ("/v1/inference", "inferq"), ("/v1/completions", "openai"),
                        ("/v1/chat/completions", "openai")):
        resp = client.post(path, **kw)
        err = resp.get_json()["error"]
        assert resp.status_code == 415, (path, content_type)
        if shape == "inferq":
            assert err["code"] == "UNSUPPORTED_MEDIA_TYPE" and set(err) == {"code", "message"}
        else:
            assert err["code"] == "unsupported_media_type" and err["type"] == "invalid_request_error"
    resp = client.post("/v1/jobs", data=body, content_type="application/json; charset=utf-8")
    assert resp.get_json()["error"]["code"] == "MODEL_NOT_FOUND"


def test_security_headers_on_every_response(client):
    for path in ("/", "/health", "/v1/models", "/no/such/route", "/ui/app.js", "/rq/", "/openapi.json"):
        resp = client.get(path)
        assert resp.headers["X-Content-Type-Options"] == "nosniff", path
        assert resp.headers["X-Frame-Options"] == "DENY", path
        assert resp.headers["Referrer-Policy"] == "same-origin", path
    csp = client.get("/").headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and "unsafe" not in csp


@pytest.fixture()
def evil_site():
    """A page on another origin (another port of loopback) that tries to submit jobs to the API."""
    pages = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path, "").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", pages
    server.shutdown()
    server.server_close()


def submitted(api_url: str) -> float:
    for line in requests.get(f"{api_url}/metrics", timeout=10).text.splitlines():
        if line.startswith('inferq_jobs_submitted_total{model="tiny"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed (make test installs it)")
def test_a_cross_site_page_cannot_submit_jobs_with_auth_off(live_api, tiny_worker, browser, evil_site):
    evil, pages = evil_site
    job = '{"operation": "infer", "model": "tiny", "max_tokens": 1, "prompt": "csrf"}'
    # A text/plain form whose one field spells a JSON body: name + "=" + value, the "=" inside the prompt.
    pages["/form"] = f"""<form method="post" enctype="text/plain" action="{live_api}/v1/jobs">
        <input name='{job[:-2]}' value='"}}'></form>
        <script>document.forms[0].submit()</script>"""
    pages["/fetch"] = f"""<script>
        const post = (type) => fetch("{live_api}/v1/jobs", {{method: "POST", mode: "no-cors",
            headers: {{"Content-Type": type}}, body: '{job}'}});
        Promise.allSettled([post("text/plain"), post("application/x-www-form-urlencoded"),
                            post("multipart/form-data")]).then(() => {{ document.title = "sent"; }});
        </script>"""
    before = submitted(live_api)
    page = browser.new_page()
    try:
        page.goto(f"{evil}/fetch")
        page.wait_for_function("document.title === 'sent'", timeout=15000)
        time.sleep(0.5)
        assert submitted(live_api) == before
        page.goto(f"{evil}/form")
        page.wait_for_url(f"{live_api}/v1/jobs", timeout=15000)
        # The form's POST landed on the API, which refused it.
        assert "FORBIDDEN_ORIGIN" in page.content()
        assert submitted(live_api) == before
        # The counter does move for a page of the API's own origin.
        page.goto(f"{live_api}/")
        status = page.evaluate(f"""fetch("/v1/jobs", {{method: "POST", headers: {{"Content-Type":
            "application/json"}}, body: '{job}'}}).then((r) => r.status)""")
        assert status == 202
        assert submitted(live_api) == before + 1
    finally:
        page.close()
