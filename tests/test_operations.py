"""Validation of submitted operations: every bad input gets a code, none echoes the prompt."""
import json

import pytest

from api.errors import body_of
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.operations import parse_operation

SECRET = "SECRET-PROMPT-TEXT"


def ok(**fields):
    return {"operation": "infer", "model": "tiny", "prompt": SECRET, **fields}


def test_defaults_follow_the_design():
    op = parse_operation(ok())
    assert (op.max_tokens, op.temperature, op.top_p, op.top_k, op.repetition_penalty, op.seed) == (
        256, 0.8, 0.95, 40, 1.1, -1)
    assert op.priority == "normal" and op.stream is True and op.stop == []


@pytest.mark.parametrize("body,code,field", [
    (b"{not json", ErrorCode.INVALID_JSON, None),
    (b"[1, 2]", ErrorCode.INVALID_REQUEST, "body"),
    ({"model": "tiny", "prompt": SECRET}, ErrorCode.INVALID_REQUEST, "operation"),
    ({"operation": "train", "model": "tiny"}, ErrorCode.UNSUPPORTED_OPERATION, None),
    ({"operation": 7, "model": "tiny"}, ErrorCode.UNSUPPORTED_OPERATION, None),
    (ok(max_tokens="many"), ErrorCode.INVALID_REQUEST, "max_tokens"),
    (ok(max_tokens="5"), ErrorCode.INVALID_REQUEST, "max_tokens"),
    (ok(max_tokens=0), ErrorCode.INVALID_REQUEST, "max_tokens"),
    (ok(max_tokens=4097), ErrorCode.INVALID_REQUEST, "max_tokens"),
    (ok(temperature=2.5), ErrorCode.INVALID_REQUEST, "temperature"),
    (ok(top_p=1.5), ErrorCode.INVALID_REQUEST, "top_p"),
    (ok(top_k=-1), ErrorCode.INVALID_REQUEST, "top_k"),
    (ok(repetition_penalty=3), ErrorCode.INVALID_REQUEST, "repetition_penalty"),
    (ok(seed=-2), ErrorCode.INVALID_REQUEST, "seed"),
    (ok(stop=["a", "b", "c", "d", "e"]), ErrorCode.INVALID_REQUEST, "stop"),
    (ok(stop=["x" * 101]), ErrorCode.INVALID_REQUEST, "stop"),
    (ok(stop=[""]), ErrorCode.INVALID_REQUEST, "stop"),
    (ok(priority="urgent"), ErrorCode.INVALID_REQUEST, "priority"),
    (ok(stream="yes"), ErrorCode.INVALID_REQUEST, "stream"),
    (ok(metadata={"blob": "x" * 5000}), ErrorCode.INVALID_REQUEST, "metadata"),
    (ok(surprise=1), ErrorCode.INVALID_REQUEST, "surprise"),
    (ok(prompt=""), ErrorCode.INVALID_REQUEST, "prompt"),
    (ok(prompt="x" * 32769), ErrorCode.INVALID_REQUEST, "prompt"),
    (ok(model="../etc"), ErrorCode.INVALID_REQUEST, "model"),
    ({"operation": "infer", "model": "tiny"}, ErrorCode.INVALID_REQUEST, "body"),
    (ok(messages=[{"role": "user", "content": "hi"}]), ErrorCode.INVALID_REQUEST, "body"),
    ({"operation": "infer", "model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
     ErrorCode.INVALID_REQUEST, "messages.0.role"),
    (ok(presence_penalty=2.5), ErrorCode.INVALID_REQUEST, "presence_penalty"),
    (ok(frequency_penalty=-3), ErrorCode.INVALID_REQUEST, "frequency_penalty"),
    (ok(logit_bias={"token": 1}), ErrorCode.INVALID_REQUEST, "logit_bias"),
    (ok(logit_bias={"12": 101}), ErrorCode.INVALID_REQUEST, "logit_bias"),
    (ok(logit_bias={str(i): 1 for i in range(1025)}), ErrorCode.INVALID_REQUEST, "logit_bias"),
    (ok(logprobs=21), ErrorCode.INVALID_REQUEST, "logprobs"),
    (ok(grammar=""), ErrorCode.INVALID_REQUEST, "grammar"),
    (ok(grammar="x" * 16385), ErrorCode.INVALID_REQUEST, "grammar"),
    (ok(json_schema=[1]), ErrorCode.INVALID_REQUEST, "json_schema"),
    (ok(json_schema={"type": "string", "maxLength": 5000}), ErrorCode.INVALID_REQUEST, "json_schema"),
    (ok(json_schema={"type": "string", "pattern": "^a{2000}$"}), ErrorCode.INVALID_REQUEST, "json_schema"),
    (ok(json_schema={"description": "x" * 17000}), ErrorCode.INVALID_REQUEST, "json_schema"),
    (ok(json_schema={"type": "object"}, grammar='root ::= "a"'), ErrorCode.INVALID_REQUEST, "body"),
    ({"operation": "embed", "model": "tiny"}, ErrorCode.INVALID_REQUEST, "input"),
    ({"operation": "embed", "model": "tiny", "input": ""}, ErrorCode.INVALID_REQUEST, "input"),
    ({"operation": "embed", "model": "tiny", "input": ["x"] * 2049}, ErrorCode.INVALID_REQUEST, "input"),
    ({"operation": "embed", "model": "tiny", "input": ["x" * 32768] * 31}, ErrorCode.INVALID_REQUEST, "input"),
    ({"operation": "embed", "model": "tiny", "input": [[-1]]}, ErrorCode.INVALID_REQUEST, "input"),
    ({"operation": "embed", "model": "tiny", "input": "x", "prompt": SECRET}, ErrorCode.INVALID_REQUEST, "prompt"),
    ({"operation": "embed", "model": "tiny", "input": "x", "metadata": {"s": "x" * 101}}, ErrorCode.INVALID_REQUEST,
     "metadata"),
])
def test_bad_input_is_rejected_with_a_code(body, code, field):
    raw = body if isinstance(body, bytes) else json.dumps(body)
    with pytest.raises(InferqError) as info:
        parse_operation(raw)
    err = info.value
    assert err.code == code
    if field is not None:
        fields = [e["field"] for e in err.errors]
        assert any(f == field or f.startswith(field + ".") for f in fields), fields
    assert SECRET not in json.dumps(body_of(err)) and SECRET not in str(err)


def test_integral_floats_count_as_integers_as_in_json_schema():
    assert parse_operation(ok(max_tokens=26.0)).max_tokens == 26
    for bad in (26.5, True, "26"):
        with pytest.raises(InferqError):
            parse_operation(ok(max_tokens=bad))


def test_embed_inputs_and_what_each_operation_needs():
    op = parse_operation({"operation": "embed", "model": "m", "input": "one"})
    assert op.inputs == ["one"] and op.needs() == ["embeddings"] and op.priority == "normal"
    assert parse_operation({"operation": "embed", "model": "m", "input": [[1, 2.0]]}).inputs == [[1, 2]]
    assert parse_operation(ok()).needs() == []
    assert parse_operation(ok(json_schema={"type": "object"}, logprobs=0)).needs() == ["grammar", "logprobs"]
    assert parse_operation(ok(logit_bias={"7": -100})).logit_bias == {"7": -100.0}


def test_chat_messages_are_accepted():
    op = parse_operation({"operation": "infer", "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert op.messages[0].content == "hi" and op.prompt is None


def test_stop_limit_counts_bytes_not_characters():
    with pytest.raises(InferqError):
        parse_operation(ok(stop=["😀" * 26]))  # 104 bytes, 26 characters
    assert parse_operation(ok(stop=["😀" * 25])).stop == ["😀" * 25]


METADATA_SAMPLES = [
    {}, {"user": "u1", "n": 3, "ratio": 0.5, "ok": True, "none": None}, {"s": "x" * 100}, {"s": "x" * 101},
    {f"k{i}": i for i in range(16)}, {f"k{i}": i for i in range(17)}, {"nested": {"a": 1}}, {"list": [1, 2]},
    {"deep": [[[[[[[[1]]]]]]]]}, {"emoji": "😀" * 100}, {"emoji": "😀" * 101},
]


@pytest.mark.parametrize("metadata", METADATA_SAMPLES, ids=lambda m: json.dumps(m)[:40])
def test_metadata_rules_enforced_are_the_published_ones(metadata):
    """The OpenAPI document's `metadata` schema and the validator agree on every sample."""
    import jsonschema_rs

    from api import create_app

    doc = create_app({"REDIS_URL": "redis://127.0.0.1:1/0", "TESTING": True}).test_client().get("/openapi.json")
    published = jsonschema_rs.validator_for(doc.get_json()["components"]["schemas"]["InferOperation"]["properties"]
                                            ["metadata"])
    try:
        parse_operation(ok(metadata=metadata))
        accepted = True
    except InferqError as exc:
        assert exc.code == ErrorCode.INVALID_REQUEST and exc.errors[0]["field"] == "metadata"
        accepted = False
    assert accepted == published.is_valid(metadata)


def test_non_finite_metadata_numbers_are_refused():
    for raw in ('{"x": NaN}', '{"x": Infinity}', '{"x": -Infinity}'):
        body = json.dumps(ok()).replace('"prompt"', f'"metadata": {raw}, "prompt"')
        with pytest.raises(InferqError) as info:
            parse_operation(body)
        assert info.value.code == ErrorCode.INVALID_REQUEST
