"""The page at / in a real headless Chromium (Debian's): submit, stream, cancel, workers, auth, resume."""
import os

import pytest

from inferq.client import Client
from tests.conftest import CHROMIUM, start_api
from tests.helpers import skip_without_llama_cpp

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="chromium is not installed (make test installs it)")


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    yield p
    context.close()


# wait_for_function is given functions, not expressions: polling an expression needs eval, which
# the page's CSP refuses.
def open_page(page, url, model):
    # The page runs under its Content-Security-Policy (api/security.py): record anything it blocks.
    page.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation', "
                         "(e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")
    page.goto(url + "/")
    page.wait_for_function(f"() => [...document.querySelectorAll('#model option')].some(o => o.value === '{model}')")
    page.select_option("#model", model)


def submit(page, prompt, max_tokens, temperature=0):
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))
    page.click("#submit")


def test_submit_and_watch_the_text_stream_in(page, live_api, tiny_worker):
    open_page(page, live_api, "tiny")
    submit(page, "def queue worker", 24)
    page.wait_for_function("() => document.querySelector('#status').textContent === 'finished'", timeout=30000)
    job = page.evaluate("JSON.parse(sessionStorage.getItem('inferq-recent'))[0]")
    stored = Client(live_api).status(job)["result"]["text"]
    assert page.inner_text("#output") == stored or page.eval_on_selector("#output", "e => e.textContent") == stored
    assert "24 tokens" in page.inner_text("#summary")
    page.wait_for_selector(f"#jobs tr[data-job='{job}'][data-state='finished']", timeout=10000)
    page.wait_for_selector("#workers tr[data-model='tiny']", timeout=10000)
    page.wait_for_function("() => document.querySelectorAll('#narration li').length > 0", timeout=10000)
    assert page.get_attribute("#dashboard-link", "href") == "/rq/"
    assert "script-src 'self'" in page.evaluate("fetch('/').then((r) => r.headers.get('content-security-policy'))")
    assert page.evaluate("window.__csp") == []


def test_cancel_a_running_job_and_screenshot_the_stream(page, live_api, slow_worker, tmp_path):
    open_page(page, live_api, "slow")
    submit(page, "a long story", 3000)
    page.wait_for_function("() => document.querySelector('#output').textContent.length > 40", timeout=30000)
    shot = os.environ.get("INFERQ_SCREENSHOT") or str(tmp_path / "page.png")
    page.screenshot(path=shot, full_page=True)
    assert os.path.getsize(shot) > 10_000
    page.click("#cancel")
    page.wait_for_function("() => document.querySelector('#status').textContent === 'cancelled'", timeout=15000)
    assert "stopped on cancelled" in page.inner_text("#summary")


# Read in one evaluate, so the job rows and the worker row are seen at the same instant.
SNAPSHOT = """(jobs) => {
  const out = document.querySelector('#output').textContent;
  const row = (id) => document.querySelector(`#jobs tr[data-job='${id}']`);
  const w = [...document.querySelectorAll('#workers tr')].find((tr) => tr.dataset.model === 'pair');
  return {chars: out.length, status: document.querySelector('#status').textContent,
          jobs: jobs.map((id) => row(id) ? row(id).dataset.state : null),
          worker: w ? {state: w.dataset.state, used: Number(w.dataset.used), text: w.children[3].textContent,
                       jobs: w.dataset.jobs.split(' ').filter(Boolean)} : null};
}"""


def shown_job(page, index=0):
    return page.evaluate("JSON.parse(sessionStorage.getItem('inferq-recent'))")[index]


@pytest.fixture(scope="module")
def pair_worker(module_workers, slow_model):
    """Two slots, ~1 ms a token: two long jobs overlap on one worker."""
    skip_without_llama_cpp()  # ctransformers has one slot
    return module_workers("pair", slow_model, "--parallel", "2")


def test_job_and_worker_states_follow_the_events(page, live_api, pair_worker):
    open_page(page, live_api, "pair")
    page.wait_for_selector("#workers tr[data-model='pair']")
    # ~8 s at temperature 0 on 2 cores (a token costs more as the context fills): it runs to max_tokens, and
    # outlives the second job, which ends at 600.
    submit(page, "a long story", 2000)
    page.wait_for_function("() => document.querySelector('#output').textContent.length > 0", timeout=30000)
    first = shown_job(page)
    # The `started` event was handled before the first token (in order); the page's 2 s poll has
    # most likely not run since the submit, so a table that waited for polling would fail here.
    snap = page.evaluate(f"({SNAPSHOT})", [first])
    assert snap["jobs"] == ["running"] and snap["worker"]["state"] == "busy", snap
    assert snap["worker"]["text"] == "busy 1/2" and snap["worker"]["jobs"] == [first], snap

    submit(page, "def queue worker", 600)  # the first job's stream stays open for its row
    page.wait_for_function(f"() => JSON.parse(sessionStorage.getItem('inferq-recent'))[0] !== '{first}'")
    second = shown_job(page)
    page.wait_for_function("() => document.querySelector('#output').textContent.length > 0", timeout=30000)
    snap = page.evaluate(f"({SNAPSHOT})", [second, first])
    assert snap["jobs"] == ["running", "running"], snap
    assert snap["worker"]["text"] == "busy 2/2" and set(snap["worker"]["jobs"]) == {first, second}, snap

    # The shorter one ends first: finished at once, and the worker down to one job within a second.
    page.wait_for_function("() => document.querySelector('#status').textContent === 'finished'", timeout=30000)
    snap = page.evaluate(f"({SNAPSHOT})", [second, first])
    assert snap["jobs"][0] == "finished" and second not in snap["worker"]["jobs"], snap  # at the same instant
    if snap["jobs"][1] == "running":  # a loaded machine may have finished both already
        page.wait_for_selector("#workers tr[data-model='pair'][data-used='1']", timeout=1000)
    # The first job, no longer shown, still ends by its own event: finished, and the worker idle.
    page.wait_for_selector(f"#jobs tr[data-job='{first}'][data-state='finished']", timeout=30000)
    page.wait_for_selector("#workers tr[data-model='pair'][data-state='idle'][data-used='0']", timeout=1000)
    assert page.inner_text("#workers tr[data-model='pair'] td:nth-child(4)") == "idle 0/2"
    assert Client(live_api).status(first)["state"] == "finished"
    assert page.evaluate("window.__csp") == []


def test_offline_models_are_shown_offline_and_not_submitted_to(page, live_api, tiny_worker, worker_factory,
                                                                tiny_model):
    gone = worker_factory("gone-away", tiny_model)
    assert gone.stop() == 0  # its model stays known (the grace period) with no worker
    open_page(page, live_api, "tiny")
    option = "#model option[value='gone-away']"
    page.wait_for_selector(option, state="attached")
    assert page.get_attribute(option, "data-status") == "offline"
    assert page.eval_on_selector(option, "o => o.disabled") is True
    assert "offline, last seen" in page.eval_on_selector(option, "o => o.textContent")
    assert page.eval_on_selector("#model option[value='tiny']", "o => o.disabled") is False
    before = page.evaluate("sessionStorage.getItem('inferq-recent')")
    page.eval_on_selector("#model", "s => { s.value = 'gone-away'; }")  # what a stale page could hold
    page.click("#submit")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('offline')")
    assert page.evaluate("sessionStorage.getItem('inferq-recent')") == before


def test_auth_on_the_page_asks_for_a_token(page, redis_url, tiny_worker):
    api = start_api(redis_url, API_TOKENS="web-token")
    url = api.url
    try:
        page.goto(url + "/")
        page.wait_for_selector("#auth:not([hidden])")
        page.fill("#token", "web-token")
        page.click("#save-token")
        page.wait_for_function("() => [...document.querySelectorAll('#model option')].some(o => o.value === 'tiny')")
        page.select_option("#model", "tiny")
        submit(page, "secured", 8)
        page.wait_for_function("() => document.querySelector('#status').textContent === 'finished'", timeout=30000)
        assert page.evaluate("sessionStorage.getItem('inferq-token')") == "web-token"
    finally:
        api.stop()


def test_a_dropped_connection_resumes_without_duplicating_text(page, redis_url, slow_worker):
    """Kill the API mid-stream and bring it back: EventSource resumes from Last-Event-ID."""
    api = start_api(redis_url, SSE_RETRY_MS=300)
    url = api.url
    try:
        open_page(page, url, "slow")
        submit(page, "keep going", 1500)
        page.wait_for_function("() => document.querySelector('#output').textContent.length > 20", timeout=30000)
        api.kill()
        api.start()  # on the same port
        page.wait_for_function("() => ['finished', 'cancelled'].includes(document.querySelector('#status')"
                               ".textContent)", timeout=60000)
        job = page.evaluate("JSON.parse(sessionStorage.getItem('inferq-recent'))[0]")
        stored = Client(url).status(job)["result"]["text"]
        assert page.eval_on_selector("#output", "e => e.textContent") == stored
    finally:
        api.stop()


@pytest.fixture(scope="module")
def chatml_worker(module_workers, model_dir):
    from inferq.testmodel import make_chat_gguf
    skip_without_llama_cpp()
    return module_workers("page-chat", make_chat_gguf(model_dir / "page-chat.gguf", "chatml"))


def test_a_conversation_in_chat_mode(page, live_api, chatml_worker, tiny_worker):
    open_page(page, live_api, "tiny")
    # No chat template in the tiny file: chat is not offered for it.
    assert page.eval_on_selector("#mode-chat", "e => e.disabled") is True
    page.select_option("#model", "page-chat")
    page.wait_for_function("() => !document.querySelector('#mode-chat').disabled")
    page.check("#mode-chat")
    assert page.is_visible("#chat-box") and not page.is_visible("#prompt-box")
    page.fill("#max-tokens", "12")
    page.fill("#temperature", "0")
    replies = []
    for turn, text in enumerate(["hello there", "and the queue?"]):
        page.fill("#chat-input", text)
        page.click("#submit")
        page.wait_for_function(f"() => document.querySelectorAll('#chat-log li.assistant[data-job]').length === "
                               f"{turn + 1} && document.querySelector('#status').textContent === 'finished'",
                               timeout=30000)
        job = page.eval_on_selector_all("#chat-log li.assistant", "els => els.map(e => e.dataset.job)")[turn]
        shown = page.eval_on_selector_all("#chat-log li.assistant", "els => els.map(e => e.textContent)")[turn]
        status = Client(live_api).status(job)
        assert status["state"] == "finished" and status["result"]["text"] == shown
        replies.append(job)
    assert page.eval_on_selector_all("#chat-log li.user", "els => els.map(e => e.textContent)") == [
        "hello there", "and the queue?"]
    # The second turn carried the whole conversation: a longer prompt.
    prompts = [next(e for e in Client(live_api).events(j) if e["type"] == "metrics")["prompt_tokens"]
               for j in replies]
    assert prompts[1] > prompts[0] + 5
    page.click("#chat-reset")
    assert page.eval_on_selector_all("#chat-log li", "els => els.length") == 0
    assert page.evaluate("window.__csp") == []
