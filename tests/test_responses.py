"""OpenAI's Responses API (``/v1/responses``), driven by the official openai client against a real API, Redis and
workers: background and foreground, streams resumed after the API died, conversations, cancel, delete, tenants."""
import json
import time

import jsonschema_rs
import openai
import pytest
import requests

from inferq.testmodel import make_scripted_gguf
from queue_schema.lifecycle import books
from tests.conftest import start_api, wait_until
from tests.helpers import bearer, skip_without_llama_cpp

pytestmark = pytest.mark.usefixtures("tiny_worker")
ENDED = ("completed", "incomplete", "failed", "cancelled")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"},
                                           "color": {"enum": ["red", "green"]}},
          "required": ["name", "age", "color"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture()
def oai(live_api):
    return openai.OpenAI(base_url=f"{live_api}/v1", api_key="unused", max_retries=0, timeout=60)


def client_for(url: str, token: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60)


def job_of(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def text_of(events) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def ended(oai, response_id: str, timeout: float = 60):
    return wait_until(lambda: (r := oai.responses.retrieve(response_id)).status in ENDED and r, timeout=timeout,
                      interval=0.2, what=f"response {response_id} to end")


def test_a_foreground_response_its_stream_and_its_stored_copy_agree(oai):
    resp = oai.responses.create(model="tiny", input="hello there", instructions="be brief", max_output_tokens=12,
                                temperature=0, metadata={"who": "test"})
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == "tiny"
    assert resp.status in ("completed", "incomplete") and resp.background is False and resp.store is True
    assert resp.instructions == "be brief" and resp.metadata == {"who": "test"} and resp.max_output_tokens == 12
    if resp.status == "incomplete":
        assert resp.incomplete_details.reason == "max_output_tokens" and resp.usage.output_tokens == 12
    assert resp.usage.input_tokens > 0 and resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    message, = resp.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert resp.output_text
    again = oai.responses.retrieve(resp.id)
    assert again.output_text == resp.output_text and again.status == resp.status and again.usage == resp.usage
    events = list(oai.responses.create(model="tiny", input="hello there", instructions="be brief",
                                       max_output_tokens=12, temperature=0, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == f"response.{resp.status}"
    assert text_of(events) == resp.output_text  # greedy: the same text streamed or not
    replayed = list(oai.responses.retrieve(events[0].response.id, stream=True))
    assert [e.model_dump() for e in replayed] == [e.model_dump() for e in events]  # the log alone decides them


def test_background_create_then_poll_to_its_end(oai):
    resp = oai.responses.create(model="tiny", input="queue worker", background=True, max_output_tokens=8,
                                temperature=0)
    assert resp.background is True and resp.status in ("queued", "in_progress") and resp.output == []
    final = ended(oai, resp.id)
    assert final.status in ("completed", "incomplete") and final.output_text and final.usage.output_tokens <= 8


def test_a_background_stream_resumes_after_its_client_left_and_after_the_api_was_killed(redis_url, slow_worker,
                                                                                         tmp_path):
    first = start_api(redis_url, tmp_path / "first.log")
    second = None
    try:
        c1 = client_for(first.url)
        stream = c1.responses.create(model="slow", input="go on", background=True, stream=True,
                                     max_output_tokens=1500, temperature=0)
        seen = []
        for event in stream:
            seen.append(event)
            if sum(e.type == "response.output_text.delta" for e in seen) >= 3:
                break
        stream.close()  # a background response's client may leave: its job goes on
        rid = seen[0].response.id
        assert [e.type for e in seen[:3]] == ["response.created", "response.queued", "response.in_progress"]
        more = c1.responses.retrieve(rid, stream=True, starting_after=seen[-1].sequence_number)
        for event in more:
            seen.append(event)
            if sum(e.type == "response.output_text.delta" for e in seen) >= 6:
                break
        first.kill()  # SIGKILL mid-stream: nothing of the process survives
        try:  # what the client had read before the process died, if anything
            seen.extend(more)
        except openai.APIError:
            pass
        second = start_api(redis_url, tmp_path / "second.log")
        c2 = client_for(second.url)
        rest = list(c2.responses.retrieve(rid, stream=True, starting_after=seen[-1].sequence_number))
        events = seen + rest
        assert [e.sequence_number for e in events] == list(range(len(events)))  # no gap, no repeat
        assert events[-1].type in ("response.completed", "response.incomplete")
        final = c2.responses.retrieve(rid)
        assert final.status in ("completed", "incomplete") and text_of(events) == final.output_text
        assert events[-1].response.output_text == final.output_text
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_a_foreground_stream_whose_client_leaves_is_cancelled(oai, slow_worker):
    stream = oai.responses.create(model="slow", input="go on", max_output_tokens=3500, temperature=0, stream=True)
    seen = []
    for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta":
            break
    stream.close()
    final = ended(oai, seen[0].response.id, timeout=20)
    assert final.status == "cancelled" and final.usage.output_tokens < 3500


def test_cancel_a_background_response(oai, slow_worker):
    resp = oai.responses.create(model="slow", input="go on", background=True, max_output_tokens=3500,
                                temperature=0)
    wait_until(lambda: oai.responses.retrieve(resp.id).output, timeout=30, interval=0.2, what="its first text")
    cancelled = oai.responses.cancel(resp.id)
    assert cancelled.id == resp.id and cancelled.status == "cancelled"
    assert oai.responses.retrieve(resp.id).status == "cancelled"
    assert oai.responses.cancel(resp.id).status == "cancelled"  # an ended response is answered as it is
    events = list(oai.responses.retrieve(resp.id, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "cancelled"
    foreground = oai.responses.create(model="tiny", input="x", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="background"):
        oai.responses.cancel(foreground.id)


def test_delete_cancels_a_running_job_and_then_the_response_is_unknown(oai, client, live_api, slow_worker):
    resp = oai.responses.create(model="slow", input="go on", background=True, max_output_tokens=3500)
    raw = requests.delete(f"{live_api}/v1/responses/{resp.id}", timeout=10)
    assert raw.status_code == 200 and raw.json() == {"id": resp.id, "object": "response.deleted", "deleted": True}
    for call in (lambda: oai.responses.retrieve(resp.id), lambda: oai.responses.delete(resp.id),
                 lambda: oai.responses.cancel(resp.id), lambda: oai.responses.input_items.list(resp.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    wait_until(lambda: client.get(f"/v1/jobs/{job_of(resp.id)}").get_json()["state"] == "cancelled", timeout=15,
               what="the deleted response's job cancelled")
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("resp_" + "0" * 32)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("not-an-id")


def test_previous_response_id_carries_the_conversation(oai, r):
    first = oai.responses.create(model="tiny", input="Hello", instructions="be brief", max_output_tokens=6,
                                 temperature=0)
    second = oai.responses.create(model="tiny", input="And then?", previous_response_id=first.id,
                                  max_output_tokens=6, temperature=0)
    assert second.previous_response_id == first.id and second.instructions is None
    # What the second job's worker renders: the first exchange, then the new turn (instructions are not carried).
    messages = books.fetch(r, job_of(second.id)).kwargs["payload"]["messages"]
    assert messages == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
                        {"role": "user", "content": "And then?"}]
    assert books.fetch(r, job_of(first.id)).kwargs["payload"]["messages"][0] == {"role": "system",
                                                                                 "content": "be brief"}
    items = list(oai.responses.input_items.list(second.id, order="asc"))
    assert [(i.type, i.role) for i in items] == [("message", "user"), ("message", "assistant"), ("message", "user")]
    assert items[1].id == first.output[0].id and items[1].content[0].text == first.output_text
    page = oai.responses.input_items.list(second.id, limit=2)  # newest first, OpenAI's default
    assert [i.id for i in page.data] == [items[2].id, items[1].id] and page.has_more
    third = oai.responses.create(model="tiny", input="More.", previous_response_id=second.id, max_output_tokens=4)
    assert len(books.fetch(r, job_of(third.id)).kwargs["payload"]["messages"]) == 5
    with pytest.raises(openai.NotFoundError) as nf:
        oai.responses.create(model="tiny", input="x", previous_response_id="resp_" + "f" * 32)
    assert nf.value.body["code"] == "previous_response_not_found"


def test_a_response_not_stored_cannot_be_read_back_nor_run_in_the_background(oai):
    resp = oai.responses.create(model="tiny", input="x", max_output_tokens=3, store=False)
    assert resp.store is False and resp.output_text
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="tiny", input="x", previous_response_id=resp.id)
    with pytest.raises(openai.BadRequestError) as br:
        oai.responses.create(model="tiny", input="x", background=True, store=False)
    assert br.value.body["param"] == "background"


def test_unsupported_tools_and_inputs_are_refused_clearly(oai):
    with pytest.raises(openai.BadRequestError, match="only function tools"):
        oai.responses.create(model="tiny", input="x", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="only text content"):
        oai.responses.create(model="tiny", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/a.png"}]}])
    with pytest.raises(openai.BadRequestError, match="not supported"):
        oai.responses.create(model="tiny", input=[{"type": "item_reference", "id": "x"}])
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="no-such-model", input="x")
    resp = oai.responses.create(model="tiny", input="x", max_output_tokens=2,
                                extra_body={"reasoning": {"effort": "low"}, "some_future_field": 1})
    assert resp.status in ("completed", "incomplete")


def test_text_format_json_schema_makes_json_matching_the_schema(oai):
    resp = oai.responses.create(model="tiny", input="a person", max_output_tokens=300, temperature=0, text={
        "format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}})
    assert resp.status == "completed" and resp.text.format.type == "json_schema"
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(resp.output_text)), resp.output_text
    # Greedy: at temperature 1 a random model may write one string until max_output_tokens (incomplete).
    obj = oai.responses.create(model="tiny", input="x", max_output_tokens=300, temperature=0,
                               text={"format": {"type": "json_object"}})
    assert obj.status == "completed", obj.incomplete_details
    assert isinstance(json.loads(obj.output_text), dict)


def test_tenants_see_only_their_own_responses(tenant_api):
    alice, bob = client_for(tenant_api.url, tenant_api.ALICE), client_for(tenant_api.url, tenant_api.BOB)
    resp = alice.responses.create(model="tiny", input="mine", max_output_tokens=2)
    assert alice.responses.retrieve(resp.id).id == resp.id
    for call in (lambda: bob.responses.retrieve(resp.id), lambda: bob.responses.cancel(resp.id),
                 lambda: bob.responses.delete(resp.id), lambda: bob.responses.input_items.list(resp.id),
                 lambda: bob.responses.create(model="tiny", input="x", previous_response_id=resp.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    admin = requests.get(f"{tenant_api.url}/v1/responses/{resp.id}", headers=bearer(tenant_api.ADMIN), timeout=10)
    assert admin.status_code == 200 and admin.json()["id"] == resp.id
    assert alice.responses.retrieve(resp.id).status in ENDED  # bob's delete did nothing


@pytest.fixture(scope="module")
def scripted(module_workers, tmp_path_factory):
    """A chatml model whose every reply is the one call (``auto``: the model's own syntax is read)."""
    skip_without_llama_cpp()
    path = make_scripted_gguf(tmp_path_factory.mktemp("responses") / "call.gguf", CALL, "chatml", n_ctx=4096)
    module_workers("resp-call", path, "--backend", "llama-cpp")
    return "resp-call"


def test_a_function_call_round_trip(oai, r, scripted):
    first = oai.responses.create(model=scripted, input="Weather in Paris?", tools=[WEATHER], temperature=0,
                                 max_output_tokens=200)
    assert first.status == "completed" and first.tools[0].name == "get_weather"
    call, = [o for o in first.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
    streamed = list(oai.responses.create(model=scripted, input="Weather in Paris?", tools=[WEATHER], temperature=0,
                                         max_output_tokens=200, stream=True))
    args = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    done, = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert args == done.arguments == call.arguments
    second = oai.responses.create(model=scripted, previous_response_id=first.id, tools=[WEATHER], temperature=0,
                                  max_output_tokens=200, input=[{"type": "function_call_output",
                                                                 "call_id": call.call_id, "output": '{"temp": 21}'}])
    messages = books.fetch(r, job_of(second.id)).kwargs["payload"]["messages"]
    assert messages[0] == {"role": "user", "content": "Weather in Paris?"}
    assert messages[1]["role"] == "assistant" and messages[1]["tool_calls"] == [
        {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]
    assert messages[2] == {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'}
    items = list(oai.responses.input_items.list(second.id, order="asc"))
    assert [i.type for i in items] == ["message", "function_call", "function_call_output"]


def test_a_stream_cut_by_the_api_stopping_raises_and_resumes_elsewhere(redis_url, slow_worker, client):
    """SIGTERM ends the open streams: an ``error`` event the SDK raises on (never a terminal event it did not
    see), numbered as the last event sent, so resuming after it loses nothing."""
    import signal

    api, other = start_api(redis_url), start_api(redis_url)
    made = []
    try:
        raw = requests.post(f"{api.url}/v1/responses", stream=True, timeout=30, json={
            "model": "slow", "input": "busy", "max_output_tokens": 1500, "temperature": 0, "stream": True,
            "background": True})
        lines = raw.iter_lines(decode_unicode=True)
        frames, event = [], None
        for line in lines:
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                frames.append((event, json.loads(line[6:])))
                if event == "response.output_text.delta":
                    break
        made.append(frames[0][1]["response"]["id"])
        assert all(name == data["type"] for name, data in frames)  # the SSE event names the type, as OpenAI's
        api.send_signal(signal.SIGTERM)
        for line in lines:
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                frames.append((event, json.loads(line[6:])))
        name, last = frames[-1]
        assert name == "error" and last["code"] == "stream_interrupted" and "cut off" in last["message"]
        assert last["sequence_number"] == frames[-2][1]["sequence_number"]
        resumed = client_for(other.url).responses.retrieve(made[0], stream=True,
                                                           starting_after=last["sequence_number"])
        rest = [next(iter(resumed))]
        resumed.close()
        numbers = [d["sequence_number"] for _, d in frames[:-1]] + [e.sequence_number for e in rest]
        assert numbers == list(range(len(numbers)))
        stream = client_for(other.url).responses.create(model="slow", input="busy", max_output_tokens=1500,
                                                        stream=True, background=True)
        it = iter(stream)
        made.append(next(it).response.id)
        other.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="cut off"):  # the SDK raises on such an end
            for _ in it:
                pass
    finally:
        api.kill()
        other.kill()
        for rid in made:  # background jobs outlive their APIs: free the one slow worker
            client.delete(f"/v1/jobs/{job_of(rid)}")


def test_an_idempotency_key_answers_with_the_same_response(oai):
    key = {"Idempotency-Key": f"resp-{time.time()}"}
    one = oai.responses.create(model="tiny", input="x", background=True, max_output_tokens=2, extra_headers=key)
    two = oai.responses.create(model="tiny", input="x", background=True, max_output_tokens=2, extra_headers=key)
    assert one.id == two.id and ended(oai, one.id).status in ("completed", "incomplete")


def test_a_failed_job_is_an_error_in_the_foreground_and_a_failed_response_in_the_background(oai):
    with pytest.raises(openai.BadRequestError, match="context"):
        oai.responses.create(model="tiny", input="word " * 600, max_output_tokens=16)
    resp = oai.responses.create(model="tiny", input="word " * 600, max_output_tokens=16, background=True)
    final = ended(oai, resp.id)
    assert final.status == "failed" and final.error.code == "invalid_prompt" and "context" in final.error.message
    events = list(oai.responses.retrieve(resp.id, stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.error.code == "invalid_prompt"
