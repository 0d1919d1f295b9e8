"""`inferq worker --chat-template`: a chat template for GGUF files that carry none, said where users look.

A file with ChatML's tokenizer and no template (a base model, a conversion that dropped it) is served three
ways by real workers: as it is (plain "Role: text" lines, a warning, `none` in /v1/models), with the built-in
chatml template (the same prompt tokens as the file that carries the template), and beside a worker that
renders another way (refused at start, one line).
"""
import subprocess
import sys

import openai
import pytest

from inferq.testmodel import CHAT_ARCHS, CHAT_TEMPLATES, chat_vocabulary, make_chat_gguf, make_llama_gguf
from queue_schema.errors import ConfigError
from tests.conftest import ROOT
from tests.helpers import skip_without_llama_cpp
from worker import chat_template

MESSAGES = [{"role": "system", "content": "You are a helpful model"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def files(model_dir):
    skip_without_llama_cpp()
    bare = make_llama_gguf(model_dir / "bare-chatml.gguf", "tiny", 0, arch=CHAT_ARCHS["chatml"],
                           vocab=chat_vocabulary("chatml"))
    return {"bare": bare, "templated": make_chat_gguf(model_dir / "flag-chatml.gguf", "chatml")}


@pytest.fixture()
def oai(live_api):
    return openai.OpenAI(base_url=f"{live_api}/v1", api_key="unused", max_retries=0, timeout=60)


def models(client):
    return {m["id"]: m for m in client.get("/v1/models").get_json()["data"]}


def prompt_tokens(oai, model):
    resp = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1, temperature=0)
    return resp.usage.prompt_tokens


def test_the_flag_gives_a_bare_file_the_family_template(files, worker_factory, client, oai):
    bare = worker_factory("bare", files["bare"])
    worker_factory("flagged", files["bare"], "--chat-template", "chatml")
    worker_factory("own", files["templated"])
    seen = models(client)
    # Said where users look: the model list names the template, and the worker's log warns.
    assert seen["bare"]["chat_template"] == "none" and "chat_template" not in seen["bare"]["capabilities"]
    assert "has no chat template" in bare.log() and "--chat-template" in bare.log()
    assert seen["flagged"]["chat_template"] == "chatml" and "chat_template" in seen["flagged"]["capabilities"]
    assert seen["own"]["chat_template"] == "gguf"
    # With the flag the bare file renders as the file that carries the template: its control tokens are
    # single tokens, so the prompts have the same length; without it the conversation is plain text.
    assert prompt_tokens(oai, "flagged") == prompt_tokens(oai, "own") != prompt_tokens(oai, "bare")


def test_workers_of_one_model_that_render_differently_refuse_to_start(files, worker_factory, redis_url):
    worker_factory("agreed", files["bare"], "--chat-template", "chatml")
    worker_factory("agreed", files["bare"], "--chat-template", "chatml")  # the same template: it serves
    proc = subprocess.run([sys.executable, "-m", "inferq", "worker", "--model", f"agreed={files['bare']}",
                           "--chat-template", "llama3", "--threads", "1", "--redis-url", redis_url],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert "template chatml" in errors[0] and "llama3" in errors[0] and "--chat-template" in errors[0]
    assert "Traceback" not in proc.stderr


def test_a_bad_flag_is_one_line(files, redis_url, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    for flag, needle in (("nosuch", "neither a built-in"), (str(broken), "not a readable Jinja template")):
        proc = subprocess.run([sys.executable, "-m", "inferq", "worker", "--model", f"badflag={files['bare']}",
                               "--chat-template", flag, "--threads", "1", "--redis-url", redis_url],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert proc.returncode == 1 and len(errors) == 1 and needle in errors[0], proc.stderr


def test_choose_prefers_the_flag_and_names_where_the_template_came_from(tmp_path):
    own = chat_template.choose(None, "{{ messages }}")
    assert own.name == "gguf" and own.source == "{{ messages }}"
    assert chat_template.choose(None, None).name == "none" and chat_template.choose(None, None).digest == "none"
    for name in chat_template.BUILTIN_NAMES:
        picked = chat_template.choose(name, "{{ messages }}")
        assert picked.name == name and picked.source == chat_template.builtin(name)
    assert chat_template.choose("chatml", None).source == CHAT_TEMPLATES["chatml"]
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    mine = chat_template.choose(str(path), None)
    assert mine.name == "file:mine.jinja" and mine.digest != chat_template.choose("chatml", None).digest
    with pytest.raises(ConfigError, match="neither a built-in"):
        chat_template.choose(str(tmp_path / "missing.jinja"), None)


def test_the_mistral_template_renders_its_turns():
    text = chat_template.render_text([*MESSAGES, {"role": "assistant", "content": "hi"},
                                      {"role": "user", "content": "again"}],
                                     chat_template.builtin("mistral"), "<s>", "</s>")
    assert text == "<s>[INST] You are a helpful model\n\nhello there[/INST] hi</s>[INST] again[/INST]"
