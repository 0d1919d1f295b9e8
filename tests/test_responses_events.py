"""The Responses builder alone: a job's log in, OpenAI's Response objects and stream events out."""
import json

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from api.openai import tool_calls
from api.openai.response_events import Builder, Meta, as_input, build, to_messages

JOB = "0123456789abcdef0123456789abcdef"
EVENTS = TypeAdapter(ResponseStreamEvent)


def meta(**settings) -> Meta:
    return Meta(JOB, 1_700_000_000, "tiny", settings)


def log(*texts, stop="eos", tool_format=None, requeue=False) -> list[dict]:
    out = [{"type": "queued", "seq": 0, "position": 0, "queue": "q"}]
    out.append({"type": "started", "model": "tiny", "worker": "w", "queue_wait_ms": 1,
                **({"tool_format": tool_format} if tool_format else {})})
    if requeue:
        out += [{"type": "queued", "position": 0, "queue": "q"}, dict(out[1])]
    out += [{"type": "token", "t": t, "i": i} for i, t in enumerate(texts)]
    out.append({"type": "metrics", "prompt_tokens": 7, "tokens_out": len(texts), "cached_tokens": 2,
                "tokens_per_sec": 1.0, "vram_bytes": 0})
    out.append({"type": "end", "tokens_out": len(texts), "decode_time_ms": 5, "stop_reason": stop,
                "text": "".join(texts), "ts": 1_700_000_009_000})
    return out


def stream(m: Meta, events) -> list[dict]:
    b = Builder(m)
    return [e for ev in events for e in b.feed(ev)]


def test_a_text_answer_streams_in_openai_order_numbered_from_zero():
    out = stream(meta(), log("Hel", "lo", " there"))
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert [e["type"] for e in out] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert out[0]["response"]["status"] == "queued" and out[1]["response"]["status"] == "in_progress"
    done = out[-1]["response"]
    assert done["status"] == "completed" and done["completed_at"] == 1_700_000_009
    message, = done["output"]
    assert message["id"] == f"msg_{JOB}" and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": "Hello there", "annotations": []}]
    assert done["usage"] == {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
                             "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": 10}
    for event in out:  # the official client's own types take every event
        EVENTS.validate_python(event)
    Response.model_validate(done)


def test_the_same_log_makes_the_same_events_and_a_resumed_stream_is_the_tail():
    events = log("a", "b", "c", stop="max_tokens")
    whole = stream(meta(background=True), events)
    assert whole == stream(meta(background=True), events)
    n = 4
    resumed = [e for e in stream(meta(background=True), events) if e["sequence_number"] > n]
    assert resumed == whole[n + 1:]
    # Read a piece at a time (the live stream) or all at once (a GET): the same object.
    assert build(meta(background=True), events).response() == whole[-1]["response"]


def test_background_sends_queued_and_max_tokens_is_incomplete():
    out = stream(meta(background=True), log("x", stop="max_tokens"))
    assert [e["type"] for e in out[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert out[-1]["type"] == "response.incomplete"
    last = out[-1]["response"]
    assert last["status"] == "incomplete" and last["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["output"][0]["status"] == "incomplete" and last["background"] is True


def test_a_cancelled_job_ends_incomplete_with_status_cancelled_and_a_failed_one_failed():
    out = stream(meta(), log("par", stop="cancelled"))
    assert out[-1]["type"] == "response.incomplete" and out[-1]["response"]["status"] == "cancelled"
    queued_then_cancelled = [{"type": "queued"}, {"type": "end", "stop_reason": "cancelled", "tokens_out": 0,
                                                  "text": "", "ts": 1}]
    out = stream(meta(), queued_then_cancelled)
    assert [e["type"] for e in out] == ["response.created", "response.incomplete"]
    assert out[-1]["response"]["output"] == []
    failed = log("half")[:-2] + [{"type": "error", "code": "WORKER_LOST", "message": "the worker died"}]
    out = stream(meta(), failed)
    assert [e["type"] for e in out[-4:]] == ["response.output_text.done", "response.content_part.done",
                                             "response.output_item.done", "response.failed"]
    resp = out[-1]["response"]
    assert resp["status"] == "failed" and resp["error"]["code"] == "server_error"
    assert "WORKER_LOST" in resp["error"]["message"] and resp["usage"] is None
    Response.model_validate(resp)


def test_a_requeued_job_makes_no_second_in_progress_and_partial_logs_show_progress():
    events = log("a", "b", requeue=True)
    types = [e["type"] for e in stream(meta(), events)]
    assert types.count("response.in_progress") == 1 and types.count("response.created") == 1
    assert build(meta(), events[:1]).response()["status"] == "queued"
    partial = build(meta(), events[:5]).response()
    assert partial["status"] == "in_progress" and partial["usage"] is None
    assert partial["output"][0]["content"][0]["text"] == "a" and partial["output"][0]["status"] == "in_progress"


def test_an_empty_answer_still_has_its_message():
    out = build(meta(), log()).response()
    assert out["output"][0]["content"][0]["text"] == "" and out["status"] == "completed"


TOOLS = [{"type": "function", "name": "get_weather", "description": None, "parameters": {"type": "object"},
          "strict": None}]


def test_calls_become_function_call_items_with_their_arguments_in_pieces():
    pieces = ["Let me look.", "\n<tool_call>\n", '{"name": "get_weather", ', '"arguments": {"city": ',
              '"Paris"}}\n</tool_call>']
    out = stream(meta(tools=TOOLS), log(*pieces, tool_format="hermes"))
    types = [e["type"] for e in out]
    assert types[-9:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.delta", "response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]
    resp = out[-1]["response"]
    message, call = resp["output"]
    assert message["content"][0]["text"] == "Let me look."
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["status"] == "completed"
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert call["id"] == f"fc_{JOB}_0" and call["call_id"] == tool_calls.call_id(f"resp_{JOB}", 0)
    deltas = "".join(e["delta"] for e in out if e["type"] == "response.function_call_arguments.delta")
    assert deltas == call["arguments"]
    done, = [e for e in out if e["type"] == "response.function_call_arguments.done"]
    assert done["arguments"] == call["arguments"] and done["output_index"] == 1
    assert types.index("response.output_text.done") < types.index("response.function_call_arguments.delta")
    for event in out:
        EVENTS.validate_python(event)


def test_without_tools_in_the_request_the_text_is_plain():
    out = build(meta(), log('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>',
                            tool_format="hermes")).response()
    assert [o["type"] for o in out["output"]] == ["message"]


def test_a_conversation_carries_calls_and_their_outputs_as_chat_messages():
    made = build(meta(tools=TOOLS), log("<tool_call>", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
                                        "</tool_call>", tool_format="hermes"))
    prior = [{"id": "msg_a_0", "type": "message", "role": "user", "status": "completed",
              "content": [{"type": "input_text", "text": "Weather in Paris?"}]}]
    items = prior + as_input(made.response()["output"])
    call_id = items[-1]["call_id"]
    items.append({"id": "fco_b_2", "type": "function_call_output", "call_id": call_id, "output": "sunny"})
    messages = to_messages(items, "be brief")
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert messages[1] == {"role": "user", "content": "Weather in Paris?"}
    assert messages[2]["role"] == "assistant" and messages[2]["tool_calls"][0]["id"] == call_id
    assert messages[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert messages[3] == {"role": "tool", "tool_call_id": call_id, "content": "sunny"}


@pytest.mark.parametrize("role", ["system", "developer"])
def test_system_and_developer_input_is_a_system_message(role):
    item = {"type": "message", "role": role, "content": [{"type": "input_text", "text": "x"}]}
    assert to_messages([item]) == [{"role": "system", "content": "x"}]


def test_a_later_run_after_output_fails_the_response_instead_of_splicing():
    from api.openai.response_events import Builder, Meta

    b = Builder(Meta("job1", 1, "m"))
    log = [{"type": "queued", "seq": 0}, {"type": "started", "seq": 1, "run": 1},
           {"type": "token", "seq": 2, "t": "lost"}, {"type": "started", "seq": 3, "run": 2},
           {"type": "token", "seq": 4, "t": "kept"}]
    events = [e for event in log for e in b.feed(event)]
    assert events[-1]["type"] == "response.failed" and b.response()["status"] == "failed"
    assert "began again" in b.response()["error"]["message"]
    # A run that wrote nothing before it was lost is no splice: the later one goes on.
    b = Builder(Meta("job2", 1, "m"))
    for event in log[:2] + [{"type": "started", "seq": 2, "run": 2}, {"type": "token", "seq": 3, "t": "x"}]:
        b.feed(event)
    assert b.status == "in_progress" and b.response()["output"][0]["content"][0]["text"] == "x"
