"""Structured output: a JSON schema or a GBNF grammar constrains what a random-weight model writes."""
import json

import jsonschema_rs
import openai
import pytest

from tests.helpers import events, skip_without_llama_cpp, submit, text_of

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["queue", "worker", "redis"]}, "maxItems": 3},
        "color": {"enum": ["red", "green"]},
    },
    "required": ["name", "age", "ok", "tags", "color"],
    "additionalProperties": False,
}
# Every string, array and number in it is bounded: the grammar completes within this many tokens.
ENOUGH = 300


@pytest.fixture(scope="module")
def llama_worker(module_workers, tiny_model):
    skip_without_llama_cpp()
    return module_workers("structured", tiny_model, "--backend", "llama-cpp", "--parallel", "3")


@pytest.fixture(scope="module")
def ct_worker(module_workers, tiny_model):
    return module_workers("structured-ct", tiny_model, "--backend", "ctransformers")


@pytest.fixture()
def oai(live_api):
    return openai.OpenAI(base_url=f"{live_api}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("temperature,seed", [(0, 0), (1, 1), (1, 2), (1, 3)])
def test_the_output_matches_the_schema_even_from_random_weights(llama_worker, oai, temperature, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    resp = oai.chat.completions.create(model="structured", messages=[{"role": "user", "content": "who?"}],
                                       response_format=fmt, max_tokens=ENOUGH, temperature=temperature, seed=seed)
    choice = resp.choices[0]
    value = json.loads(choice.message.content)
    print(temperature, seed, choice.message.content)
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(value), value
    # The grammar completed, so only the end of generation was allowed: it stopped there.
    assert choice.finish_reason == "stop" and resp.usage.completion_tokens < ENOUGH


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_mode_gives_an_object(llama_worker, oai, stream):
    # Nudged towards closing the object, so the random model ends well within max_tokens.
    kwargs = dict(model="structured", response_format={"type": "json_object"}, max_tokens=64, temperature=0,
                  logit_bias={str(tiny_token("}")): 30}, stream=stream)
    chat = oai.chat.completions.create(messages=[{"role": "user", "content": "data"}], **kwargs)
    # The legacy route takes it too (the SDK has no parameter for it there).
    legacy = oai.completions.create(prompt="data", extra_body={"response_format": kwargs.pop("response_format")},
                                    **kwargs)
    if stream:
        chat, legacy = list(chat), list(legacy)
        texts = ["".join(c.choices[0].delta.content or "" for c in chat),
                 "".join(c.choices[0].text for c in legacy)]
        finishes = [c.choices[0].finish_reason for c in chat + legacy if c.choices[0].finish_reason]
    else:
        texts = [chat.choices[0].message.content, legacy.choices[0].text]
        finishes = [chat.choices[0].finish_reason, legacy.choices[0].finish_reason]
    assert all(isinstance(json.loads(t), dict) for t in texts) and finishes == ["stop", "stop"], texts


def tiny_token(piece: str) -> int:
    from inferq.testmodel import vocabulary

    return vocabulary()[0].index(piece)


def test_a_grammar_on_the_jobs_route(llama_worker, client):
    job = submit(client, model="structured", prompt="answer", grammar='root ::= ("yes" | "no") "!"',
                 max_tokens=20, temperature=1, seed=5)
    evts = events(client, job)
    assert evts[-1]["type"] == "end" and evts[-1]["stop_reason"] == "eos"
    assert text_of(evts) in ("yes!", "no!") and evts[-1]["text"] == text_of(evts)


def test_a_bad_grammar_fails_its_job_only(llama_worker, client):
    good = [submit(client, model="structured", prompt=p, max_tokens=60, temperature=0, repetition_penalty=1.0)
            for p in ("busy", "watch")]
    bad = submit(client, model="structured", prompt="x", grammar="root ::= undefined-rule", max_tokens=8)
    last = events(client, bad)[-1]
    assert last["type"] == "error" and last["code"] == "INVALID_REQUEST" and "grammar" in last["message"]
    for j in good:
        last = events(client, j)[-1]
        assert last["type"] == "end" and last["tokens_out"] == 60


def test_a_grammar_no_token_can_follow_fails_cleanly_and_the_worker_lives_on(llama_worker, client):
    # No token's piece starts with a NUL byte: llama.cpp's grammar rules every token out. Sampled the
    # usual way, llama.cpp would accept a forbidden token and abort the whole worker.
    stuck = submit(client, model="structured", prompt="x", grammar='root ::= "\\x00"', max_tokens=8)
    last = events(client, stuck)[-1]
    assert last["type"] == "error" and last["code"] == "INVALID_REQUEST" and "allows no token" in last["message"]
    after = events(client, submit(client, model="structured", prompt="still there?", max_tokens=4))
    assert after[-1]["type"] == "end" and after[-1]["tokens_out"] == 4


def test_a_bad_schema_is_refused(llama_worker, oai, client):
    resp = client.post("/v1/jobs", json={"operation": "infer", "model": "structured", "prompt": "x",
                                         "json_schema": {"type": "array", "minItems": 100000}})
    assert resp.status_code == 422 and resp.get_json()["error"]["errors"][0]["field"] == "json_schema"
    resp = client.post("/v1/jobs", json={"operation": "infer", "model": "structured", "prompt": "x",
                                         "grammar": "root ::= \"a\"", "json_schema": {"type": "object"}})
    assert resp.status_code == 422
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="structured", messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert info.value.body["code"] == "invalid_request" and "json_schema" in info.value.message


def test_a_backend_that_cannot_constrain_is_refused_at_submit(ct_worker, oai, client):
    models = {m["id"]: m for m in client.get("/v1/models").get_json()["data"]}
    assert models["structured-ct"]["capabilities"] == ["logprobs"]
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="structured-ct", messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_object"})
    assert info.value.body["code"] == "unsupported_feature" and "structured output" in info.value.message
    before = client.get("/v1/models").get_json()
    resp = client.post("/v1/jobs", json={"operation": "infer", "model": "structured-ct", "prompt": "x",
                                         "grammar": "root ::= \"a\""})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "UNSUPPORTED_FEATURE"
    queued = {m["id"]: m["queued"] for m in before["data"]}["structured-ct"]
    assert {m["id"]: m["queued"] for m in client.get("/v1/models").get_json()["data"]}["structured-ct"] == queued


def test_a_raw_grammar_is_bounded_like_a_schema(client):
    """Repetitions are written out by llama.cpp's grammar parser: their counts, what they copy and the
    nesting of groups are bounded at submit, as json_schema's counts are (nothing was, before)."""
    for grammar in ('root ::= "a"{5000}', 'root ::= ' + "(" * 40 + '"a"' + ")" * 40,
                    'root ::= "' + "x" * 500 + '"{999}'):
        resp = client.post("/v1/jobs", json={"operation": "infer", "model": "structured", "prompt": "x",
                                             "grammar": grammar})
        assert resp.status_code == 422, grammar[:40]
        assert resp.get_json()["error"]["errors"][0]["field"] == "grammar"
    # Braces and parentheses inside strings, classes and comments are text, not syntax.
    fine = 'root ::= "{5000}" [(((] "a"{3,5}  # {99999} ((((((((((((((((((((((((((((((((((\n'
    resp = client.post("/v1/jobs", json={"operation": "infer", "model": "no-such-model", "prompt": "x",
                                         "grammar": fine})
    assert resp.get_json()["error"]["code"] == "MODEL_NOT_FOUND"


def test_a_grammar_too_slow_to_sample_ends_its_job_alone(worker_factory, tiny_model, client):
    """A grammar sample past the worker's bound ends that job; a plain job decoded in the same steps
    finishes. The bound is set low here so that an ordinary grammar passes it."""
    skip_without_llama_cpp()
    worker_factory("slow-grammar", tiny_model, "--backend", "llama-cpp", "--parallel", "2", "--grammar-limit",
                   "0.000001")
    plain = submit(client, model="slow-grammar", prompt="go", max_tokens=40, temperature=0)
    ruled = submit(client, model="slow-grammar", prompt="go", max_tokens=40, grammar='root ::= [a-z ]+')
    last = events(client, ruled)[-1]
    assert last["type"] == "error" and last["code"] == "INVALID_REQUEST" and "sample one token" in last["message"]
    assert events(client, plain)[-1]["type"] == "end"
