"""`inferq up --chat-template`: the flag reaches the workers `inferq up` starts, as it would `inferq worker`."""
import os
import signal
import subprocess
import sys

import openai
import pytest

from inferq.embedded_redis import free_port
from inferq.testmodel import CHAT_ARCHS, chat_vocabulary, make_llama_gguf
from tests.conftest import ROOT, wait_until
from tests.helpers import models_at, skip_without_llama_cpp


@pytest.fixture(scope="module")
def bare_chatml(model_dir):
    """ChatML's tokenizer and no template: what the flag is for."""
    skip_without_llama_cpp()
    return make_llama_gguf(model_dir / "up-bare-chatml.gguf", "tiny", 0, arch=CHAT_ARCHS["chatml"],
                           vocab=chat_vocabulary("chatml"))


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["INFERQ_DATA_DIR"] = str(tmp_path / "data")
    return env


@pytest.mark.slow
def test_up_passes_the_chat_template_to_its_workers(tmp_path, bare_chatml):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    proc = subprocess.Popen([sys.executable, "-m", "inferq", "--log-level", "WARNING", "up", "--port", str(port),
                             "--threads", "1", "--model", f"bare={bare_chatml}", "--chat-template", "chatml"],
                            cwd=ROOT, env=_env(tmp_path), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        def online():
            assert proc.poll() is None, log.read_text(errors="replace")
            return models_at(url).get("bare", {}).get("status") == "online"

        wait_until(online, timeout=90, what="inferq up")
        bare = models_at(url)["bare"]
        assert bare["chat_template"] == "chatml" and "chat_template" in bare["capabilities"], bare
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        resp = oai.chat.completions.create(model="bare", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, temperature=0)
        assert resp.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    out = log.read_text(errors="replace")
    assert code == 0 and "Traceback" not in out, out
    assert "has no chat template" not in out  # the worker got the flag: no warning about a bare file


def test_a_bad_chat_template_fails_up_in_one_line_before_anything_starts(tmp_path, tiny_model):
    proc = subprocess.run([sys.executable, "-m", "inferq", "up", "--port", str(free_port()), "--model",
                           f"t={tiny_model}", "--chat-template", "nosuch"],
                          cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "neither a built-in" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "data").exists()  # no Redis was started
