"""The OpenAI routes, driven by the official openai client against a real API and worker."""
import math
import time

import openai
import pytest
import requests

from inferq.testmodel import make_llama_gguf
from tests.conftest import start_api, wait_until
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
    # Greedy decoding of the seeded test model: the same sample every run, so this holds or always fails.
    assert words, f"no word to stop on in the sample: {base!r}"
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
        oai.completions.create(model="tiny", prompt="x", n=5)
    assert br.value.body["param"] == "n" and br.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as br:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                    logit_bias={"99999": 5})
    assert "vocabulary" in br.value.message
    with pytest.raises(openai.BadRequestError) as br:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                    logit_bias={"a token": 5})
    assert br.value.body["param"].startswith("logit_bias")
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
                                       user="alice", extra_body={"some_future_field": True})
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


def _newest_jobs(client, model: str, since_ms: int, n: int) -> list[dict]:
    page = client.get("/v1/jobs", query_string={"model": model, "limit": 20}).get_json()["data"]
    return [j for j in page if j["submitted_ms"] >= since_ms][:n]


def _wait_cancelled(client, job_ids, timeout=15.0):
    wait_until(lambda: all(client.get(f"/v1/jobs/{j}").get_json()["state"] == "cancelled" for j in job_ids),
               timeout=timeout, what=f"jobs {job_ids} cancelled")


def test_a_non_streamed_request_whose_client_left_is_cancelled(oai, client, slow_worker):
    """The client times out and closes its connection: the worker stops instead of running the job for nobody.
    Before, such a job ran to its end (1,100 of them kept a worker busy for 12 minutes)."""
    since = int(time.time() * 1000)
    impatient = oai.with_options(timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="slow", messages=[{"role": "user", "content": "go on"}],
                                          max_tokens=3500, temperature=0)
    job, = _newest_jobs(client, "slow", since, 1)
    _wait_cancelled(client, [job["job_id"]])
    end = events(client, job["job_id"])[-1]
    assert end["type"] == "end" and end["stop_reason"] == "cancelled" and end["tokens_out"] < 3500
    # n > 1: every choice (the second waits in the queue behind the first: one slot) is cancelled.
    since = int(time.time() * 1000)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="slow", prompt="go on", max_tokens=3500, temperature=0, n=2)
    jobs = _newest_jobs(client, "slow", since, 2)
    assert len(jobs) == 2
    _wait_cancelled(client, [j["job_id"] for j in jobs])


def test_an_idempotent_request_outlives_its_client_and_embeddings_do_not(oai, client, slow_worker):
    """With an Idempotency-Key the client said it would come back: its job goes on. /v1/embeddings without
    one is cancelled like a completion (here while it waits behind the long job)."""
    since = int(time.time() * 1000)
    impatient = oai.with_options(timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="slow", prompt="go on", max_tokens=3000, temperature=0,
                                     extra_headers={"Idempotency-Key": f"keep-{since}"})
    kept, = _newest_jobs(client, "slow", since, 1)
    since = int(time.time() * 1000)
    with pytest.raises(openai.APITimeoutError):
        impatient.embeddings.create(model="slow", input=["one", "two"])
    embed, = _newest_jobs(client, "slow", since, 1)
    _wait_cancelled(client, [embed["job_id"]])
    state = client.get(f"/v1/jobs/{kept['job_id']}").get_json()["state"]
    assert state == "running", state
    assert client.delete(f"/v1/jobs/{kept['job_id']}").status_code == 202
    _wait_cancelled(client, [kept["job_id"]])


def test_openai_jobs_carry_a_queue_wait_bound_unless_idempotent(oai, client, r):
    """A job made for a connection that may die (its API process with it) carries ttl_s: a worker that
    reaches it much later ends it with TIMEOUT, instead of running 78 jobs nobody can collect."""
    from queue_schema.lifecycle import books

    resp = oai.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0)
    job = books.fetch(r, resp.id.removeprefix("cmpl-"))
    assert job.kwargs["payload"]["ttl_s"] == 300
    keyed = oai.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0,
                                   extra_headers={"Idempotency-Key": f"k-{time.time()}"})
    assert "ttl_s" not in books.fetch(r, keyed.id.removeprefix("cmpl-")).kwargs["payload"]


def test_chat_uses_the_models_own_template(oai, worker_factory, model_dir, tiny_model):
    from worker import chat_template
    from worker.backends import LoadOptions, load_backend

    path = make_llama_gguf(model_dir / "templated.gguf", "tiny", seed=0, chat_template=TEMPLATE)
    worker_factory("templated", path)
    msgs = [{"role": "user", "content": "hello there"}]
    backend = load_backend("llama-cpp", str(tiny_model), LoadOptions(threads=1))
    try:
        # The template writes </s>, the file's EOS: one token, as llama.cpp parses it.
        own = len(backend.tokenize(chat_template.render(msgs, TEMPLATE), add_bos=True, special=True))
        fallback = len(backend.tokenize(chat_template.render(msgs, None), add_bos=True, special=True))
        as_text = len(backend.tokenize(chat_template.render(msgs, TEMPLATE), add_bos=True, special=False))
    finally:
        backend.close()
    assert own != fallback and own < as_text
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

    api = start_api(redis_url)
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=30)
    try:
        stream = client.completions.create(model="slow", prompt="busy", max_tokens=2000, temperature=0,
                                           stream=True, extra_body={})
        it = iter(stream)
        next(it)
        api.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="cut off"):
            for _ in it:
                pass
    finally:
        api.kill()


def tiny_token(piece: str) -> int:
    from inferq.testmodel import vocabulary

    return vocabulary()[0].index(piece)


def test_chat_logprobs_streamed_and_not(oai):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "the queue"}], max_tokens=12, temperature=0,
                  logprobs=True, top_logprobs=3)
    resp = oai.chat.completions.create(**kwargs)
    entries = resp.choices[0].logprobs.content
    assert len(entries) == resp.usage.completion_tokens == 12
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and sum(math.exp(t) for t in tops) <= 1.0001
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob <= 0  # greedy
        assert e.bytes == list(e.token.encode()) or "\ufffd" in e.token
    text = bytes(b for e in entries for b in e.bytes).decode("utf-8", errors="replace")
    assert text == resp.choices[0].message.content
    chunks = list(oai.chat.completions.create(stream=True, **kwargs))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # Two runs of a greedy job: the same tokens; their logprobs can differ in the last digit (the second
    # run's prompt comes from the prefix cache, computed in another batch shape).
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == resp.choices[0].message.content
    plain = oai.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == resp.choices[0].message.content


def test_completion_logprobs_in_the_legacy_shape(oai):
    resp = oai.completions.create(model="tiny", prompt="def data", max_tokens=8, temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(p) for top, p in zip(lp.top_logprobs,
                                                                                       lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    chunks = list(oai.completions.create(model="tiny", prompt="def data", max_tokens=8, temperature=0, logprobs=2,
                                         stream=True))
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens


def test_token_events_carry_logprobs_when_asked(client, tiny):
    job = submit_job(client, model=tiny, prompt="the data model", max_tokens=10, temperature=0, logprobs=2,
                     stop=["xq"])
    evts = events(client, job)
    tokens = [e for e in evts if e["type"] == "token"]
    assert [e["i"] for e in tokens] == list(range(10))  # one event per token, even when it releases no text
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 and e["top_logprobs"][0]["token"] == e["token"]
               for e in tokens)
    assert "".join(e["t"] for e in tokens) == evts[-1]["text"]
    plain = [e for e in events(client, submit_job(client, model=tiny, prompt="the data model", max_tokens=10,
                                                  temperature=0)) if e["type"] == "token"]
    assert all("logprob" not in e for e in plain) and "".join(e["t"] for e in plain) == evts[-1]["text"]


def submit_job(client, **fields):
    from tests.helpers import submit

    return submit(client, **fields)


def test_n_choices_are_jobs_run_together_with_derived_seeds(oai, live_api, client, r):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    msgs = [{"role": "user", "content": "tell"}]
    raw = requests.post(f"{live_api}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": msgs, "n": 3, "seed": 7, "temperature": 1, "max_tokens": 10})
    body = raw.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    job_ids = raw.headers["X-Inferq-Job-Id"].split(",")
    assert len(job_ids) == 3 and body["id"] == f"chatcmpl-{job_ids[0]}"
    seeds = [Job.fetch(j, connection=r, serializer=JSONSerializer).kwargs["payload"]["seed"] for j in job_ids]
    assert seeds == [7, 8, 9]
    for job_id, choice in zip(job_ids, body["choices"]):
        status = client.get(f"/v1/jobs/{job_id}").get_json()
        assert status["state"] == "finished" and status["result"]["text"] == choice["message"]["content"]
    assert body["usage"]["completion_tokens"] == 30
    assert len({c["message"]["content"] for c in body["choices"]}) > 1  # different seeds, different texts
    streamed = oai.chat.completions.with_raw_response.create(
        model="tiny", messages=msgs, n=3, seed=7, temperature=1, max_tokens=10, stream=True,
        stream_options={"include_usage": True})
    job_ids = streamed.headers["X-Inferq-Job-Id"].split(",")
    chunks = list(streamed.parse())
    for i, job_id in enumerate(job_ids):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        text = client.get(f"/v1/jobs/{job_id}").get_json()["result"]["text"]
        assert "".join(c.delta.content or "" for c in mine) == text
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 30


def test_n_streamed_choices_interleave_as_they_come(oai, worker_factory, slow_model):
    worker_factory("oai-n", slow_model, "--parallel", "3")
    chunks = list(oai.completions.create(model="oai-n", prompt="busy", n=3, seed=1, temperature=1, max_tokens=400,
                                         stream=True))
    indexes = [c.choices[0].index for c in chunks if c.choices[0].text]
    assert set(indexes) == {0, 1, 2} and indexes != sorted(indexes)  # not one choice after another
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1, 2]


def test_openai_routes_take_no_top_k_and_no_repetition_penalty(oai, r):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    resp = oai.completions.create(model="tiny", prompt="x", max_tokens=1)
    payload = Job.fetch(resp.id.removeprefix("cmpl-"), connection=r, serializer=JSONSerializer).kwargs["payload"]
    assert (payload["top_k"], payload["repetition_penalty"], payload["temperature"], payload["top_p"]) == (0, 1, 1, 1)


def test_logit_bias_forces_and_bans_tokens(oai):
    queue = tiny_token("\u2581queue")
    forced = oai.completions.create(model="tiny", prompt="def", max_tokens=5, temperature=0,
                                    logit_bias={str(queue): 100})
    assert forced.choices[0].text == " queue" * 5
    base = oai.completions.create(model="tiny", prompt="def", max_tokens=12, temperature=0, logprobs=0)
    first = base.choices[0].logprobs.tokens[0]
    banned = oai.completions.create(model="tiny", prompt="def", max_tokens=12, temperature=0, logprobs=0,
                                    logit_bias={str(tiny_token(first.replace(" ", "\u2581"))): -100})
    assert first not in banned.choices[0].logprobs.tokens


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_presence_and_frequency_penalties_break_repetition(oai, penalty):
    kwargs = dict(model="tiny", prompt="def data", max_tokens=40, temperature=0, logprobs=0)
    plain = oai.completions.create(**kwargs).choices[0].logprobs.tokens
    penalized = oai.completions.create(**kwargs, **{penalty: 2}).choices[0].logprobs.tokens
    print(penalty, len(set(plain)), len(set(penalized)))
    assert penalized != plain and len(set(penalized)) > len(set(plain))


def test_the_numpy_sampler_takes_the_same_controls(client, tiny):
    queue = tiny_token("\u2581queue")
    evts = events(client, submit_job(client, model=tiny, prompt="def", max_tokens=4, temperature=0,
                                     logit_bias={str(queue): 100}, repetition_penalty=1.0))
    assert evts[-1]["text"] == " queue" * 4
    fields = dict(model=tiny, prompt="def data", max_tokens=40, temperature=0, repetition_penalty=1.0, logprobs=0)
    plain = [e["token"] for e in events(client, submit_job(client, **fields)) if e["type"] == "token"]
    penalized = [e["token"] for e in events(client, submit_job(client, **fields, frequency_penalty=2,
                                                               presence_penalty=1)) if e["type"] == "token"]
    assert penalized != plain and len(set(penalized)) > len(set(plain))
