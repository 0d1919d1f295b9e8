"""The OpenAI routes, driven by the official openai client against a real API and worker."""
import time

import openai
import pytest
import requests

from inferq.testmodel import make_llama_gguf
from tests.conftest import wait_until
from tests.helpers import events

pytestmark = pytest.mark.usefixtures("tiny_worker")
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture()
def oai(live_api):
    return openai.OpenAI(base_url=f"{live_api}/v1", api_key="unused", max_retries=0, timeout=30)


def test_completion_non_streamed(oai, client):
    resp = oai.completions.create(model="tiny", prompt="def data", max_tokens=12, temperature=0)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-") and resp.model == "tiny"
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 12 and resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12
    # It was an ordinary job: visible with the same text.
    job_id = resp.id.removeprefix("cmpl-")
    status = client.get(f"/v1/jobs/{job_id}").get_json()
    assert status["state"] == "finished" and status["result"]["text"] == choice.text


def test_completion_streamed_with_usage(oai):
    chunks = list(oai.completions.create(model="tiny", prompt="def data", max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    whole = oai.completions.create(model="tiny", prompt="def data", max_tokens=12, temperature=0)
    assert text == whole.choices[0].text  # greedy: same text streamed or not


def test_chat_non_streamed_and_streamed(oai):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    resp = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, seed=1)
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens == 10 and resp.choices[0].finish_reason == "length"
    stream = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, seed=1,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_and_max_completion_tokens(oai):
    base = oai.completions.create(model="tiny", prompt="queue worker", max_tokens=40, temperature=0).choices[0].text
    words = [w for w in base.split(" ") if w.isalnum() and len(w) > 1]
    if not words:
        pytest.skip("no word to stop on in the sample")
    stop = words[0]
    resp = oai.completions.create(model="tiny", prompt="queue worker", max_tokens=40, temperature=0, stop=stop)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == base[: base.find(stop)]
    chat = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=3, temperature=0)
    assert chat.usage.completion_tokens == 3


def test_errors_in_openai_shape(oai, live_api):
    with pytest.raises(openai.NotFoundError) as nf:
        oai.completions.create(model="no-such-model", prompt="x")
    assert nf.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        oai.completions.create(model="tiny", prompt="x", n=2)
    assert br.value.body["param"] == "n" and br.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="tiny", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="tiny", messages=[])
    raw = requests.post(f"{live_api}/v1/chat/completions", data=b"{oops", timeout=10,
                        headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "code", "param"}
    assert raw.json()["error"]["code"] == "invalid_json"


def test_unknown_openai_fields_are_ignored(oai):
    resp = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       presence_penalty=0.5, logit_bias={"1": 1}, user="alice",
                                       extra_body={"some_future_field": True})
    assert resp.usage.completion_tokens == 2


def test_models_in_openai_shape(oai):
    ids = [m.id for m in oai.models.list()]
    assert "tiny" in ids


def test_context_overflow_is_a_400(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tiny", prompt="word " * 600, max_tokens=16)
    assert "context" in info.value.message


def test_disconnecting_a_stream_cancels_its_job(oai, client, slow_worker):
    stream = oai.chat.completions.create(model="slow", messages=[{"role": "user", "content": "go on"}],
                                         max_tokens=3500, temperature=0, stream=True)
    job_id = None
    for n, chunk in enumerate(stream):
        job_id = chunk.id.removeprefix("chatcmpl-")
        if n >= 3:
            break
    stream.close()
    deadline = time.monotonic() + 15
    while client.get(f"/v1/jobs/{job_id}").get_json()["state"] != "cancelled":
        assert time.monotonic() < deadline, "the abandoned job was not cancelled"
        time.sleep(0.1)
    end = events(client, job_id)[-1]
    assert end["stop_reason"] == "cancelled" and end["tokens_out"] < 3500
    t0 = time.monotonic()
    nxt = oai.completions.create(model="slow", prompt="next", max_tokens=3, temperature=0)
    assert nxt.usage.completion_tokens == 3 and time.monotonic() - t0 < 10


def test_chat_uses_the_models_own_template(oai, worker_factory, model_dir, tiny_model):
    from worker import chat_template
    from worker.backends import LoadOptions, load_backend

    path = make_llama_gguf(model_dir / "templated.gguf", "tiny", seed=0, chat_template=TEMPLATE)
    worker_factory("templated", path)
    msgs = [{"role": "user", "content": "hello there"}]
    backend = load_backend("ctransformers", str(tiny_model), LoadOptions(threads=1))
    own = len(backend.tokenize(chat_template.render(msgs, TEMPLATE)))
    fallback = len(backend.tokenize(chat_template.render(msgs, None)))
    assert own != fallback
    with_template = oai.chat.completions.create(model="templated", messages=msgs, max_tokens=1)
    without = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=1)
    assert with_template.usage.prompt_tokens == own
    assert without.usage.prompt_tokens == fallback


def test_a_hostile_template_is_refused_by_the_sandbox():
    from jinja2.exceptions import SecurityError

    from worker import chat_template

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(SecurityError):
        chat_template.render([{"role": "user", "content": "x"}], evil)


def _submitted(r, model: str) -> int:
    from queue_schema import keys

    return int(r.hget(keys.COUNTERS, f"submitted|{model}") or 0)


def test_a_failed_streamed_job_ends_with_an_error_chunk_and_no_done(live_api, oai):
    raw = requests.post(f"{live_api}/v1/completions", timeout=30, stream=True,
                        json={"model": "tiny", "prompt": "word " * 600, "max_tokens": 16, "stream": True}).text
    assert '"error"' in raw and "context_length_exceeded" in raw and "[DONE]" not in raw
    with pytest.raises(openai.APIError, match="context"):
        list(oai.completions.create(model="tiny", prompt="word " * 600, max_tokens=16, stream=True))


@pytest.mark.slow
def test_the_sdk_never_runs_a_lost_job_twice(live_api, r, worker_factory, slow_model):
    victim = worker_factory("oai-lost", slow_model, "--parallel", "2")
    retrying = openai.OpenAI(base_url=f"{live_api}/v1", api_key="unused", max_retries=2, timeout=60)
    before = _submitted(r, "oai-lost")
    result = {}

    def call():
        try:
            retrying.completions.create(model="oai-lost", prompt="busy", max_tokens=3000, temperature=0)
        except openai.APIStatusError as exc:
            result["error"] = exc

    import threading

    t = threading.Thread(target=call)
    t.start()
    wait_until(lambda: _submitted(r, "oai-lost") > before, what="the job")
    time.sleep(0.5)
    victim.proc.send_signal(__import__("signal").SIGKILL)
    t.join(40)
    err = result["error"]
    assert err.status_code == 500 and err.response.headers["x-should-retry"] == "false"
    assert "worker_lost" in str(err.body)
    time.sleep(1)
    assert _submitted(r, "oai-lost") == before + 1  # no automatic second run


def test_a_stream_cut_by_the_api_stopping_raises_instead_of_passing_for_whole(redis_url, slow_worker):
    import signal
    import subprocess
    import sys

    from inferq.embedded_redis import free_port
    from tests.conftest import ROOT

    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf",
                            "--bind", f"127.0.0.1:{port}", "api.wsgi:app"], cwd=ROOT,
                           env={**__import__("os").environ, "REDIS_URL": redis_url},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
    try:
        wait_until(lambda: _ok(f"http://127.0.0.1:{port}"), what="the API")
        stream = client.completions.create(model="slow", prompt="busy", max_tokens=2000, temperature=0,
                                           stream=True, extra_body={})
        it = iter(stream)
        next(it)
        api.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="cut off"):
            for _ in it:
                pass
    finally:
        if api.poll() is None:
            api.kill()
        api.wait(15)


def _ok(url):
    try:
        return requests.get(url + "/health", timeout=1).ok
    except requests.RequestException:
        return False
