"""The scripted test model: a real GGUF whose every reply is a given text, read back through llama.cpp.

Tool-call parser tests need a model that really emits a tool call; these check that the file does, byte
for byte, from any prompt, and that a worker serves it as it serves any chat model.
"""
import pytest

from inferq.testmodel import chat_vocabulary, make_scripted_gguf, script_pieces
from tests.helpers import events, skip_without_llama_cpp, submit, text_of

llama_cpp = pytest.importorskip("llama_cpp")

HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
LLAMA31 = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
MISTRAL = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'
# A prompt made of the chain's own texts and the script itself: still tokenized to the base vocabulary.
PROMPTS = ("hello there", "<0x3C>0<0xC3>1 " + HERMES + "\n")


def greedy(llm, prompt: str) -> tuple[list[int], list[int], int]:
    """Prompt tokens, reply tokens and the token that ended the reply, at temperature 0 without penalties."""
    prompt_tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    reply = []
    for token in llm.generate(prompt_tokens, temp=0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(reply) > 400:
            return prompt_tokens, reply, token
        reply.append(token)


@pytest.mark.parametrize("flavour,script", [
    ("chatml", HERMES), ("llama3", HERMES), ("gemma", HERMES), ("mistral", HERMES),
    ("llama3", LLAMA31), ("mistral", MISTRAL), ("chatml", ""),
])
def test_the_greedy_reply_to_any_prompt_is_the_script(flavour, script, tmp_path):
    path = make_scripted_gguf(tmp_path / f"{flavour}.gguf", script, flavour)
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=1, verbose=False)
    base = chat_vocabulary(flavour)
    end = base.eot_id if base.eot_id is not None else base.eos_id
    n_base = len(base.tokens)
    for prompt in PROMPTS:
        prompt_tokens, reply, last = greedy(llm, prompt)
        assert max(prompt_tokens) < n_base  # no prompt reaches the chain: it would start mid-script
        assert llm.detokenize(reply) == script.encode() and last == end
        assert reply == list(range(n_base, n_base + len(script.encode())))


def test_the_chain_tokens_are_bytes_made_unique_by_their_ids():
    assert script_pieces("aü", 7) == ["<0x61>7", "<0xC3>8", "<0xBC>9"]


def test_a_worker_replies_with_the_script(tmp_path, worker_factory, client):
    skip_without_llama_cpp()
    path = make_scripted_gguf(tmp_path / "scripted.gguf", HERMES, "chatml")
    worker_factory("scripted-chatml", path, "--backend", "llama-cpp")
    messages = [{"role": "user", "content": "What is the weather in Zürich?"}]
    # Greedy, and the defaults (temperature 0.8, repetition penalty 1.1): the script's margin holds either way.
    for sampling in ({"temperature": 0, "repetition_penalty": 1}, {}):
        job = submit(client, model="scripted-chatml", messages=messages, max_tokens=200, **sampling)
        evts = events(client, job)
        assert text_of(evts) == HERMES
        assert evts[-1]["type"] == "end" and evts[-1]["stop_reason"] == "eos" and evts[-1]["text"] == HERMES
