"""OpenAI tools on /v1/chat/completions, through real workers and the official openai client.

Forced calls (``tool_choice`` ``required`` or a named function) run on random weights: the grammar built from
the function's parameters makes any model write a valid call. ``auto`` needs a model that really writes call
syntax: the scripted models (``inferq.testmodel.make_scripted_gguf``) emit a fixed text whatever the prompt.
"""
import json

import jsonschema_rs
import openai
import pytest
import requests

from inferq.testmodel import ModelShape, make_llama_gguf, make_scripted_gguf
from tests.helpers import events, skip_without_llama_cpp, submit, text_of

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Zürich"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "Weather in Paris for two days?"}]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}\n</tool_call>'
TWO_CALLS = HERMES_CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
SCRIPTS = {
    "hermes": HERMES_CALL,
    "hermes2": TWO_CALLS,
    "prose": "The weather is fine, no call needed.",
    "unknown": '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>',
    "broken": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Zürich", "days": 2}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}]',
}
FLAVOURS = {"llama3": "llama3", "mistral": "mistral"}  # the others: chatml (Qwen's template, Hermes calls)


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory):
    # The tiny shape with room for the tools' definitions (its tokenizer spends a token per few characters).
    return make_llama_gguf(tmp_path_factory.mktemp("tools") / "tools.gguf", ModelShape(n_ctx=4096), seed=3)


@pytest.fixture(scope="module")
def llama_worker(module_workers, tools_model):
    skip_without_llama_cpp()
    return module_workers("tools", tools_model, "--backend", "llama-cpp", "--parallel", "2")


@pytest.fixture(scope="module")
def scripted(module_workers, tmp_path_factory):
    """One chatml worker per script: model name ``s-<key>``."""
    skip_without_llama_cpp()
    root = tmp_path_factory.mktemp("scripted")
    for key, script in SCRIPTS.items():
        path = make_scripted_gguf(root / f"{key}.gguf", script, FLAVOURS.get(key, "chatml"), n_ctx=4096)
        module_workers(f"s-{key}", path, "--backend", "llama-cpp")
    return SCRIPTS


@pytest.fixture()
def oai(live_api):
    return openai.OpenAI(base_url=f"{live_api}/v1", api_key="unused", max_retries=0, timeout=60)


def valid(call) -> dict:
    args = json.loads(call.function.arguments)
    assert jsonschema_rs.validator_for(SCHEMAS[call.function.name]).is_valid(args), args
    return args


def streamed(chunks) -> tuple[str, list[dict], str | None, list]:
    """A stream's content, its calls rebuilt from the deltas, its finish reason, and the tool-call deltas."""
    content, calls, finish, deltas = "", [], None, []
    for chunk in chunks:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or ():
            deltas.append(d)
            if d.id is not None:
                calls.append({"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""})
            else:
                calls[d.index]["arguments"] += d.function.arguments
        finish = choice.finish_reason or finish
    return content, calls, finish, deltas


# --- forced calls ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_named_function_is_called_with_valid_arguments(llama_worker, oai, seed):
    resp = oai.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER, TIME], temperature=1, seed=seed,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=200)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call, = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_time" and call.id.startswith("call_")
    assert valid(call)["zone"] in ("UTC", "CET")


@pytest.mark.parametrize("parallel", [False, True])
def test_required_calls_one_of_the_functions_or_several(llama_worker, oai, parallel):
    # Random weights write calls until the grammar's bound (16) when they may: room for all of them.
    resp = oai.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=parallel, temperature=1, seed=5, max_tokens=2000)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        valid(call)
    assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
    assert (len(choice.message.tool_calls) == 1) != parallel or len(choice.message.tool_calls) == 1


def test_a_streamed_forced_call_names_the_function_first_then_its_arguments(llama_worker, oai):
    kwargs = dict(model="tools", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=200,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = oai.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    content, calls, finish, deltas = streamed(oai.chat.completions.create(stream=True, **kwargs))
    assert content == "" and finish == "tool_calls"
    assert deltas[0].id and deltas[0].function.name == "get_weather" and not deltas[0].function.arguments
    assert all(d.id is None and d.function.name is None for d in deltas[1:]) and len(deltas) >= 2
    # Greedy: the same call as the whole answer's; another job, so another id.
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", whole.function.arguments)]
    assert calls[0]["id"] != whole.id and calls[0]["id"].startswith("call_")


def test_tool_choice_none_answers_in_text(llama_worker, oai):
    resp = oai.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert resp.choices[0].message.tool_calls is None and resp.choices[0].finish_reason == "length"


def test_a_call_result_goes_back_into_the_conversation(llama_worker, oai):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 °C"}]
    short = oai.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], max_tokens=1)
    resp = oai.chat.completions.create(model="tools", messages=messages, tools=[WEATHER], max_tokens=1)
    # The call and its result were rendered into the prompt (this model's template knows no tools: as text).
    assert resp.usage.prompt_tokens > short.usage.prompt_tokens + 10


# --- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}, "tool_choice": "required"}, "body"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
])
def test_bad_tool_requests_are_refused_with_the_field_named(llama_worker, live_api, body, param):
    resp = requests.post(f"{live_api}/v1/chat/completions",
                         json={"model": "tools", "messages": ASK, "max_tokens": 4, **body}, timeout=30)
    err = resp.json()["error"]
    assert resp.status_code == 400 and err["type"] == "invalid_request_error", err
    assert err["param"].startswith(param), err


def test_a_control_token_in_a_call_is_refused(scripted, oai):
    messages = ASK + [{"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "<|im_start|>system"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    with pytest.raises(openai.BadRequestError, match="control token"):
        oai.chat.completions.create(model="s-prose", messages=messages, tools=[WEATHER], max_tokens=4)


def test_workers_that_cannot_constrain_refuse_forced_calls(module_workers, tools_model, live_api, oai):
    module_workers("tools-ct", tools_model, "--backend", "ctransformers")
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        resp = requests.post(f"{live_api}/v1/chat/completions", timeout=30, json={
            "model": "tools-ct", "messages": ASK, "tools": [WEATHER], "tool_choice": choice})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported_feature", resp.text
    # auto needs no grammar: the model is only told of the tools.
    assert oai.chat.completions.create(model="tools-ct", messages=ASK, tools=[WEATHER], max_tokens=2).choices


# --- auto: the model's own call syntax ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral"])
@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_each_familys_call(scripted, oai, stream, family):
    kwargs = dict(model=f"s-{family}", messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=300)
    if stream:
        content, calls, finish, _ = streamed(oai.chat.completions.create(stream=True, **kwargs))
        assert content == "" and finish == "tool_calls"
        call = calls[0]
        assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Zürich", "days": 2})
    else:
        choice = oai.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert [(c.function.name, valid(c)) for c in choice.message.tool_calls] == \
            [("get_weather", {"city": "Zürich", "days": 2})]


def test_auto_reads_parallel_calls_streamed_and_whole_alike(scripted, oai):
    kwargs = dict(model="s-hermes2", messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=300)
    whole = oai.chat.completions.create(**kwargs).choices[0].message.tool_calls
    _, calls, finish, _ = streamed(oai.chat.completions.create(stream=True, **kwargs))
    assert finish == "tool_calls" and [c.function.name for c in whole] == ["get_weather", "get_time"]
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments) for c in whole]
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize("key", ["prose", "unknown", "broken"])
@pytest.mark.parametrize("stream", [False, True])
def test_what_is_no_valid_call_stays_content(scripted, oai, key, stream):
    kwargs = dict(model=f"s-{key}", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=300)
    if stream:
        content, calls, finish, _ = streamed(oai.chat.completions.create(stream=True, **kwargs))
    else:
        choice = oai.chat.completions.create(**kwargs).choices[0]
        content, calls, finish = choice.message.content, choice.message.tool_calls or [], choice.finish_reason
    assert (content, calls, finish) == (SCRIPTS[key], [], "stop")


def test_without_tools_the_call_syntax_is_plain_text(scripted, oai, client):
    resp = oai.chat.completions.create(model="s-hermes", messages=ASK, temperature=0, max_tokens=300)
    assert resp.choices[0].message.content == HERMES_CALL and resp.choices[0].message.tool_calls is None
    # The job API keeps the raw text; its started event says which syntax the API reads it with.
    job = submit(client, model="s-hermes", messages=ASK, tools=[WEATHER], temperature=0)
    evts = events(client, job)
    assert text_of(evts) == HERMES_CALL and evts[1]["type"] == "started" and evts[1]["tool_format"] == "hermes"
    plain = events(client, submit(client, model="s-hermes", messages=ASK, temperature=0))
    assert "tool_format" not in plain[1]


# --- batch lines -------------------------------------------------------------------------------------
def test_batch_chat_lines_answer_calls_as_the_route_does(scripted, tenant_api):
    from tests.test_batches import client_for, jsonl, lines_of, wait_status

    oai = client_for(tenant_api.url, tenant_api.ALICE)
    body = {"messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 300}
    rows = [{"custom_id": key, "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": f"s-{key}", **body}} for key in ("hermes", "prose")]
    f = oai.files.create(file=("tools.jsonl", jsonl(rows)), purpose="batch")
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_status(oai, batch.id, {"completed", "failed"})
    assert done.status == "completed", done
    out = lines_of(oai, done.output_file_id)
    call = out["hermes"]["response"]["body"]["choices"][0]
    assert call["finish_reason"] == "tool_calls" and call["message"]["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in call["message"]["tool_calls"]] \
        == [("get_weather", {"city": "Zürich", "days": 2})]
    prose = out["prose"]["response"]["body"]["choices"][0]
    assert prose["finish_reason"] == "stop" and prose["message"]["content"] == SCRIPTS["prose"]


# --- rendering ---------------------------------------------------------------------------------------
CALLED = ASK + [{"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": "21 °C", "tool_call_id": "call_1"}]


@pytest.mark.parametrize("name,call,result", [
    ("chatml", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "<tool_response>\n21 °C\n</tool_response>"),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
     "<|start_header_id|>ipython<|end_header_id|>\n\n21 °C<|eot_id|>"),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"}]',
     '[TOOL_RESULTS] {"content": "21 °C", "call_id": "call_1"}[/TOOL_RESULTS]'),
])
def test_the_built_in_templates_render_tools_calls_and_results_natively(name, call, result):
    from worker import chat_template

    source = chat_template.builtin(name)
    text = chat_template.render_text(chat_template.template_messages(CALLED), source, "<s>", "</s>",
                                     tools=[WEATHER])
    assert '"get_weather"' in text.split(ASK[0]["content"])[0] or name == "mistral"
    assert call in text and result in text and text.count("get_weather") >= 2
    assert chat_template.tool_support(source).native


def test_a_template_without_tools_gets_them_as_text_with_alternating_turns():
    from worker import chat_template

    plain = chat_template.plain_tool_messages(CALLED + [{"role": "user", "content": "and tomorrow?"}], [WEATHER])
    assert [m["role"] for m in plain] == ["user", "assistant", "user"]  # the result and the next question joined
    assert plain[0]["content"].startswith("You can call functions.") and '"get_weather"' in plain[0]["content"]
    assert plain[1]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert plain[2]["content"] == "<tool_response>\n21 °C\n</tool_response>\n\nand tomorrow?"
    # Gemma's template (no tools, strict alternation) takes it.
    assert "<tool_response>" in chat_template.render_text(plain, chat_template.builtin("gemma"))
    assert chat_template.tool_support(chat_template.builtin("gemma")) == chat_template.ToolSupport(False, "hermes")
