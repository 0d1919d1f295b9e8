"""The ctransformers backend on a real (tiny) GGUF file."""
import pytest

from inferq.testmodel import make_llama_gguf
from worker.backends import LoadOptions, ModelLoadError, load_backend
from worker.backends.base import SamplingParams
from worker.backends.direct import DirectDecoder

WIDE = ("😀漢字🎉한국어ß∑" * 1000)[:5000]


@pytest.fixture(scope="module")
def backend(tiny_model):
    return load_backend("ctransformers", str(tiny_model), LoadOptions(threads=1))


@pytest.fixture()
def decoder(backend):
    return DirectDecoder(backend)


def take(gen, n):
    out = []
    for token in gen:
        out.append(token)
        if len(out) == n:
            break
    return out


def test_loads_and_reports_shape(backend):
    assert backend.name == "ctransformers"
    assert backend.context_length == 512
    assert backend.eos_token_id == 2


def test_byte_fallback_prompt_of_5000_characters_round_trips(backend):
    # ctransformers' own LLM.tokenize sizes its buffer by characters and would
    # overflow here: 5000 characters are ~15000 byte-fallback tokens.
    tokens = backend.tokenize(WIDE)
    assert len(tokens) > len(WIDE)
    assert tokens[0] == 1  # BOS
    assert backend.detokenize(tokens[1:]) == b" " + WIDE.encode()
    # The heap is intact: the model still tokenizes and decodes normally.
    assert backend.detokenize(backend.tokenize("plain ascii")[1:]) == b" plain ascii"


def test_greedy_decoding_is_deterministic_and_prefix_reuse_is_exact(backend, decoder):
    prompt = backend.tokenize("the data model")
    first = take(decoder.generate(prompt, SamplingParams.greedy()), 40)
    # Same prompt again: the cached prefix is reused; the output must not change.
    again = take(decoder.generate(prompt, SamplingParams.greedy()), 40)
    other = take(decoder.generate(backend.tokenize("import queue"), SamplingParams.greedy()), 5)
    after_other = take(decoder.generate(prompt, SamplingParams.greedy()), 40)
    assert first == again == after_other
    assert len(first) == 40 and other


def test_health_probe_decodes_and_leaves_generation_unchanged(backend, decoder):
    prompt = backend.tokenize("the data model")
    before = take(decoder.generate(prompt, SamplingParams.greedy()), 10)
    assert backend.health() is True
    decoder.reset()  # the probe emptied slot 0
    assert take(decoder.generate(prompt, SamplingParams.greedy()), 10) == before


def test_generation_stops_when_asked(backend, decoder):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 5

    out = list(decoder.generate(backend.tokenize("hello"), SamplingParams.greedy(), should_stop))
    assert len(out) <= 5


@pytest.mark.parametrize("content,message", [
    (None, "not found"),
    (b"not a gguf file at all", "not a GGUF file"),
])
def test_bad_files_fail_with_one_clear_message(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        load_backend("auto", str(path), LoadOptions())
    assert message in info.value.message


def test_truncated_gguf_fails_cleanly(tmp_path, tiny_model):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_model.read_bytes()[:50_000])
    with pytest.raises(ModelLoadError):
        load_backend("ctransformers", str(path), LoadOptions())


def test_model_maker_is_deterministic(tmp_path):
    a = make_llama_gguf(tmp_path / "a.gguf", seed=3).read_bytes()
    b = make_llama_gguf(tmp_path / "b.gguf", seed=3).read_bytes()
    c = make_llama_gguf(tmp_path / "c.gguf", seed=4).read_bytes()
    assert a == b and a != c
