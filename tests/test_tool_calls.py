"""Tool calls read from a model's text: each format whole, and streamed in random pieces to the same answer."""
import json
import random
import re

import pytest

from api.openai.tool_calls import (
    FORMATS,
    ArgsDelta,
    Call,
    CallStart,
    ContentDelta,
    Parsed,
    ToolStream,
    call_id,
    call_names,
    parse,
)

NAMES = ("get_weather", "search")
WEATHER = '{"city": "Paris", "unit": "c"}'
TRICKY = r'{"q": "café \"quoted\" {brace} [x] </tool_call> ; }", "n": [1, {"a": null}], "e": "\\"}'


def hermes(*calls, before="", close=True):
    end = "</tool_call>" if close else ""
    return before + "\n".join(f"<tool_call>\n{{\"name\": \"{n}\", \"arguments\": {a}}}\n{end}" for n, a in calls)


# --- whole texts: (format, text, expected content, expected calls) -----------------------------------------
CASES = [
    # hermes
    ("hermes", hermes(("get_weather", WEATHER)), None, [("get_weather", WEATHER)]),
    ("hermes", hermes(("get_weather", WEATHER), ("search", '{"q": "x"}')), None,
     [("get_weather", WEATHER), ("search", '{"q": "x"}')]),
    ("hermes", hermes(("search", '{"q": "x"}'), before="Let me look.\n\n"), "Let me look.", [("search", '{"q": "x"}')]),
    ("hermes", hermes(("search", '{"q": "x"}'), before="  \n"), None, [("search", '{"q": "x"}')]),
    ("hermes", hermes(("search", '{"q": "x"}'), close=False), None, [("search", '{"q": "x"}')]),
    ("hermes", hermes(("search", '{"q": "x"}'), ("search", '{"q": "y"}')).removesuffix("</tool_call>") + "\n", None,
     [("search", '{"q": "x"}'), ("search", '{"q": "y"}')]),
    ("hermes", '<tool_call>{"name":"search","arguments":{}}</tool_call>\n\n', None, [("search", "{}")]),
    ("hermes", hermes(("search", TRICKY)), None, [("search", TRICKY)]),
    ("hermes", '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>', None,
     [("search", '{"q": "x"}')]),
    ("hermes", '<tool_call>{"name": "search", "arguments": {"q": "日本語 ✓"}}</tool_call>', None,
     [("search", '{"q": "日本語 ✓"}')]),
    ("hermes", '<tool_call>{"name": "search", "type": "function", "id": "7", "arguments":\n  {"q": 1}  }</tool_call>',
     None, [("search", '{"q": 1}')]),
    # llama3
    ("llama3", '{"name": "get_weather", "parameters": ' + WEATHER + "}", None, [("get_weather", WEATHER)]),
    ("llama3", '\n<|python_tag|>{"type": "function", "name": "search", "parameters": {"q": "x"}}', None,
     [("search", '{"q": "x"}')]),
    ("llama3", '{"name": "search", "arguments": {"q": "x"}}; {"name": "get_weather", "parameters": {}};', None,
     [("search", '{"q": "x"}'), ("get_weather", "{}")]),
    ("llama3", '{"name": "search", "parameters": {"q": "x"}}\n{"name": "search", "parameters": ' + TRICKY + "}\n",
     None, [("search", '{"q": "x"}'), ("search", TRICKY)]),
    # mistral
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": ' + WEATHER + ', "id": "abc123XYZ"}]', None,
     [("get_weather", WEATHER)]),
    ("mistral", 'Checking both.\n[TOOL_CALLS][{"name": "search", "arguments": {"q": "x"}}, '
     '{"name": "search", "arguments": ' + TRICKY + "}]\n", "Checking both.",
     [("search", '{"q": "x"}'), ("search", TRICKY)]),
    # json
    ("json", '{"name": "search", "arguments": {"q": "x"}}', None, [("search", '{"q": "x"}')]),
    ("json", ' [ {"name": "search", "arguments": {"q": "x"}} ,{"name": "get_weather", "arguments": '
     + WEATHER + "} ] ", None, [("search", '{"q": "x"}'), ("get_weather", WEATHER)]),
]

# Texts that hold no valid call: each is content, unchanged, whole.
CONTENT = [
    ("hermes", "Just an answer."),
    ("hermes", ""),
    ("hermes", "a < b and <tool means nothing"),
    ("hermes", hermes(("delete_everything", "{}"))),  # unknown name
    ("hermes", hermes(("search", '{"q": "x"}'), ("nope", "{}"))),  # one bad call spoils all
    ("hermes", hermes(("search", '{"q": "x",}'))),  # bad JSON
    ("hermes", hermes(("search", '["x"]'))),  # arguments not an object
    ("hermes", hermes(("search", '"[1]"'))),  # a JSON string that holds no object
    ("hermes", hermes(("search", '"{not json"'))),
    ("hermes", hermes(("search", "NaN"))),
    ("hermes", hermes(("search", '{"n": Infinity}'))),
    ("hermes", hermes(("search", '{"q": "x"}')) + "\nHope that helps!"),  # text after a call
    ("hermes", "<tool_call>\n" + '{"name": "search", "arguments": {"q": "x"'),  # cut short
    ("hermes", hermes(("search", '{"q": "x"}')) + "<tool_call>"),
    # only the last </tool_call> may go unwritten
    ("hermes", hermes(("search", '{"q": "x"}'), ("search", '{"q": "y"}'), close=False)),
    ("hermes", '<tool_call>{"name": "search"}</tool_call>'),  # no arguments
    ("hermes", '<tool_call>{"name": "search", "arguments": {}, "parameters": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "search", "arguments": {}, "extra": 1}</tool_call>'),
    ("hermes", '<tool_call>{"name": "search", "arguments": {}} trailing</tool_call>'),
    ("hermes", '<tool_call>[{"name": "search", "arguments": {}}]</tool_call>'),
    ("llama3", "The weather is fine."),
    ("llama3", "  {not a call}"),
    ("llama3", '{"answer": 42}'),
    ("llama3", '{"name": "search", "parameters": {"q": "x"}} and then some'),
    ("llama3", '{"name": "search", "parameters": {"q": "x"}}\n{"name": "other", "parameters": {}}'),
    ("llama3", '{"type": "tool", "name": "search", "parameters": {}}'),
    ("llama3", "<|python_tag|>print('hi')"),
    ("mistral", "No tools needed."),
    ("mistral", '[TOOL_CALLS] [{"name": "search", "arguments": {"q": "x"}}] extra'),
    ("mistral", "[TOOL_CALLS] []"),
    ("mistral", "[TOOL_CALLS] ["),
    ("json", '{"name": "search", "arguments": {"q": "x"}} {"name": "search", "arguments": {}}'),
    ("json", '[{"name": "search", "arguments": {"q": "x"}}, 3]'),
    ("json", '{"name": "search", "arguments": 3}'),
    ("json", "[]"),
    ("json", '{"name": "search", "arguments": {"q": "x"}'),
]


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_calls(fmt, text, content, calls):
    parsed = parse(text, fmt, NAMES)
    assert parsed == Parsed(content, tuple(Call(n, a) for n, a in calls))
    for call in parsed.calls:
        assert isinstance(json.loads(call.arguments), dict)


@pytest.mark.parametrize("fmt,text", CONTENT)
def test_content(fmt, text):
    assert parse(text, fmt, NAMES) == Parsed(text, ())


def test_arguments_are_the_models_own_text():
    args = '{ "city" :"Paris",\n  "days": 3.50 }'
    for fmt, text in [("hermes", f'<tool_call>{{"name": "get_weather", "arguments":  {args}\n}}</tool_call>'),
                      ("llama3", f'{{"name": "get_weather", "parameters": {args}}}'),
                      ("mistral", f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {args}}}]'),
                      ("json", f'{{"name": "get_weather", "arguments": {args}}}')]:
        assert parse(text, fmt, NAMES).calls == (Call("get_weather", args),)


def test_only_offered_names():
    text = hermes(("search", '{"q": "x"}'))
    assert parse(text, "hermes", ["search"]).calls
    assert parse(text, "hermes", []) == Parsed(text, ())
    assert parse(text, "hermes", {"get_weather"}) == Parsed(text, ())


def test_unknown_format():
    with pytest.raises(ValueError):
        parse("x", "chatml", NAMES)
    with pytest.raises(ValueError):
        ToolStream("chatml", NAMES)


def test_call_id():
    assert call_id("job-1", 0) == call_id("job-1", 0)
    assert re.fullmatch(r"call_[0-9a-f]{24}", call_id("job-1", 0))
    assert len({call_id(j, i) for j in ("job-1", "job-2", "job-10") for i in range(3)}) == 9
    assert call_id("job-1", 11) != call_id("job-11", 1)


def test_call_names():
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}},
             {"type": "function", "function": {"name": "get_weather"}}]
    assert call_names(tools) == ["search", "get_weather"]
    assert call_names([]) == []


# --- streams ------------------------------------------------------------------------------------------------
def stream(text, fmt, cuts, names=NAMES):
    """Feed ``text`` cut at ``cuts``; every event, with what feed() answered before close()."""
    s = ToolStream(fmt, names)
    bounds = [0, *sorted(cuts), len(text)]
    fed = [s.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])]
    closing = s.close()
    return s, [e for events in fed for e in events] + closing, closing


def rebuild(events):
    content, calls = "", []
    for e in events:
        if isinstance(e, ContentDelta):
            assert e.text and not calls, "content only before the calls, never empty"
            content += e.text
        elif isinstance(e, CallStart):
            assert e.index == len(calls)
            calls.append([e.name, ""])
        else:
            assert isinstance(e, ArgsDelta) and e.index == len(calls) - 1 and e.text
            calls[-1][1] += e.text
    return content, tuple(Call(n, a) for n, a in calls)


ALL = [(fmt, text) for fmt, text, _, _ in CASES] + CONTENT + [
    ("hermes", "Sure! " * 30 + hermes(("search", TRICKY))),
    ("hermes", "Use <tool_call> like this: <tool_call>{oops}</tool_call> and keep talking. " * 3),
    ("mistral", "Use [TOOL_ not like this [TOOL_CALLS] [x] then more text"),
    ("llama3", "   \n  Plain answer after whitespace."),
]


@pytest.mark.parametrize("fmt,text", ALL)
def test_stream_agrees_with_parse(fmt, text):
    want = parse(text, fmt, NAMES)
    rng = random.Random(f"{fmt}:{text}")
    splits = [[], list(range(1, len(text)))]  # whole, and one character at a time
    splits += [rng.sample(range(1, len(text)), rng.randint(0, min(12, len(text) - 1))) for _ in range(40)
               if len(text) > 1]
    for cuts in splits:
        s, events, _ = stream(text, fmt, cuts)
        assert rebuild(events) == (want.content or "", want.calls)
        assert s.result == want


def test_stream_passes_content_on_at_once():
    s = ToolStream("hermes", NAMES)
    assert s.feed("Hello, ") == [ContentDelta("Hello,")]  # trailing whitespace may precede a call
    assert s.feed("world <tool_c") == [ContentDelta(" world")]
    assert s.feed("ar is a toy") == [ContentDelta(" <tool_car is a toy")]
    s = ToolStream("llama3", NAMES)
    assert s.feed("  ") == []
    assert s.feed("No") == [ContentDelta("  No")]
    assert s.feed(" call.") == [ContentDelta(" call.")]
    assert s.close() == [] and s.result == Parsed("  No call.", ())


def test_stream_gives_up_holding_as_soon_as_it_cannot_be_a_call():
    s = ToolStream("json", NAMES)
    assert s.feed('{"answer": ') == []
    assert s.feed('42}') == [ContentDelta('{"answer": 42}')]  # a whole object, not a call
    assert s.feed(" more") == [ContentDelta(" more")]
    s = ToolStream("hermes", NAMES)
    assert s.feed("Ok.\n<tool_call>\n") == [ContentDelta("Ok.")]
    assert s.feed('{"name": "search", "arguments": {}}\n</tool_call>') == []
    assert s.feed(" then text") == [ContentDelta("\n<tool_call>\n{\"name\": \"search\", \"arguments\": {}}\n"
                                                 "</tool_call> then text")]
    assert s.close() == []


def test_stream_emits_calls_at_close_in_the_pieces_they_came_in():
    pieces = ["I'll check.", "\n<tool_call>", '\n{"name": "get_weather", "arguments": {"city"', ': "Pa',
              'ris"}}\n', "</tool_call>", "\n<tool_call>", '{"name": "search", "arguments": {"q": "x"}}']
    s = ToolStream("hermes", NAMES)
    fed = [e for p in pieces for e in s.feed(p)]
    assert fed == [ContentDelta("I'll check.")]
    assert s.close() == [CallStart(0, "get_weather"), ArgsDelta(0, '{"city"'), ArgsDelta(0, ': "Pa'),
                         ArgsDelta(0, 'ris"}'), CallStart(1, "search"), ArgsDelta(1, '{"q": "x"}')]
    assert s.result == Parsed("I'll check.", (Call("get_weather", '{"city": "Paris"}'), Call("search", '{"q": "x"}')))


def test_stream_string_arguments_come_whole():
    s, events, closing = stream('{"name": "search", "arguments": "{\\"q\\": 1}"}', "json", [5, 40])
    assert closing == [CallStart(0, "search"), ArgsDelta(0, '{"q": 1}')]


ARGS = ["{}", '{"q": "x"}', WEATHER, TRICKY, '{"q": "\\u00e9\\n", "k": [true, false, -1.5e3]}', '"{\\"q\\": 2}"']


def random_text(fmt, rng):
    """Calls in ``fmt``'s syntax, often with one character changed, dropped or added, or cut short."""
    calls = [(rng.choice(NAMES), rng.choice(ARGS)) for _ in range(rng.randint(1, 3))]
    key = "parameters" if fmt == "llama3" and rng.random() < 0.5 else "arguments"
    objs = [f'{{"name": "{n}",{rng.choice(["", " ", chr(10)])}"{key}": {a}}}' for n, a in calls]
    before = rng.choice(["", "", "Sure.", "Let me check <b>this</b> [first].\n", " \n"])
    if fmt == "hermes":
        text = before + "".join(f"<tool_call>{rng.choice(['', chr(10)])}{o}\n</tool_call>\n" for o in objs)
    elif fmt == "llama3":
        text = rng.choice(["", "<|python_tag|>", " "]) + rng.choice([";", "\n", "; "]).join(objs)
    elif fmt == "mistral":
        text = before + "[TOOL_CALLS] [" + ", ".join(objs) + "]"
    else:
        text = objs[0] if len(objs) == 1 and rng.random() < 0.5 else "[" + ",".join(objs) + "]"
    roll, i = rng.random(), rng.randrange(len(text))
    if roll < 0.2:
        text = text[:i] + text[i + 1:]
    elif roll < 0.4:
        text = text[:i] + rng.choice('{}[]",:;\\ x<>') + text[i:]
    elif roll < 0.5:
        text = text[:i]
    elif roll < 0.6:
        text += rng.choice(["\n", " Done.", "<tool_call>", "[TOOL_CALLS]", "}"])
    return text


@pytest.mark.parametrize("fmt", FORMATS)
def test_stream_random_texts(fmt):
    """Many texts, right and broken, in random pieces: the stream and parse() never disagree."""
    rng, with_calls = random.Random(fmt), 0
    for _ in range(400):
        text = random_text(fmt, rng)
        want = parse(text, fmt, NAMES)
        with_calls += bool(want.calls)
        cuts = rng.sample(range(1, len(text)), rng.randint(0, min(15, len(text) - 1))) if len(text) > 1 else []
        s, events, _ = stream(text, fmt, cuts)
        assert rebuild(events) == (want.content or "", want.calls), text
        assert s.result == want
    assert 150 < with_calls < 350  # both kinds well tried


def test_stream_misuse():
    s = ToolStream("hermes", NAMES)
    with pytest.raises(RuntimeError):
        s.result
    s.close()
    assert s.close() == []
    with pytest.raises(RuntimeError):
        s.feed("x")
