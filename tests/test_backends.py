"""Backend choice (--backend auto) and the llama-cpp backend on real GGUF files."""
import subprocess
import sys

import pytest

from inferq.testmodel import make_llama_gguf
from tests.conftest import ROOT
from worker.backends import LoadOptions, ModelLoadError, load_backend
from worker.backends.base import SamplingParams
from worker.backends.direct import DirectDecoder
from worker.backends.selection import choose, ctransformers_refusal, installed
from worker.gguf_meta import GGUFInfo, read_info

needs_llama = pytest.mark.skipif("llama-cpp" not in installed(), reason="llama-cpp is not installed")


@pytest.fixture(scope="module")
def qwen2_model(model_dir):
    return make_llama_gguf(model_dir / "qwen2.gguf", "tiny", seed=2, arch="qwen2")


def test_auto_routes_by_what_the_file_needs(tiny_model, qwen2_model):
    llama, qwen = read_info(str(tiny_model)), read_info(str(qwen2_model))
    both = {"ctransformers", "llama-cpp"}
    assert choose(llama, "auto", {"ctransformers"}).backend == "ctransformers"
    assert choose(llama, "auto", both).backend == "llama-cpp"  # faster when both can serve it
    assert choose(qwen, "auto", both).backend == "llama-cpp"
    assert "qwen2" in choose(qwen, "auto", both).reason
    with pytest.raises(ModelLoadError) as info:
        choose(qwen, "auto", {"ctransformers"})
    assert "inferq[llama]" in info.value.message
    with pytest.raises(ModelLoadError) as info:
        choose(qwen, "ctransformers", both)
    assert "--backend llama-cpp" in info.value.message
    with pytest.raises(ModelLoadError) as info:
        choose(llama, "llama-cpp", {"ctransformers"})
    assert "inferq[llama]" in info.value.message


@pytest.mark.parametrize("arch,tokenizer,types,refused", [
    ("llama", "llama", {"F16", "Q4_0", "Q6_K"}, False),
    ("llama", "gpt2", {"F16"}, True),  # Llama 3's BPE tokenizer
    ("falcon", "gpt2", {"Q8_0"}, False),
    ("phi3", "llama", {"F16"}, True),
    ("llama", "llama", {"IQ4_XS", "F32"}, True),
    ("llama", "llama", {"BF16"}, True),
])
def test_what_ctransformers_predates(arch, tokenizer, types, refused):
    info = GGUFInfo(arch, tokenizer, None, 4096, None, frozenset(types))
    assert (ctransformers_refusal(info) is not None) == refused


def test_ctransformers_only_install_refuses_a_new_file_in_one_line(tmp_path, qwen2_model, redis_url):
    # Shadow llama_cpp with a module that fails to import, exactly as a missing install does.
    shadow = tmp_path / "shadow" / "llama_cpp"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'llama_cpp'\")\n")
    env = {"PYTHONPATH": f"{tmp_path / 'shadow'}:{ROOT}", "PATH": "/usr/bin:/bin"}
    # A worker that fails to load leaves its model's record (no capabilities) in the session's Redis for the
    # grace period: a name no other test, nor the fuzzer's short strings, would ask for.
    proc = subprocess.run([sys.executable, "-m", "inferq", "worker", "--model", f"refused-qwen2={qwen2_model}",
                           "--redis-url", redis_url], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert "inferq[llama]" in errors[0] and "qwen2" in errors[0]


@needs_llama
def test_llama_cpp_serves_qwen2_and_reports_why(client, worker_factory, qwen2_model):
    from tests.helpers import events, submit

    worker_factory("qwen", qwen2_model)
    workers = [w for w in client.get("/v1/workers").get_json()["workers"] if w["model"] == "qwen"]
    assert workers[0]["backend"] == "llama-cpp" and "qwen2" in workers[0]["backend_reason"]
    job = submit(client, model="qwen", prompt="hello 😀 漢字", max_tokens=8, temperature=0)
    last = events(client, job)[-1]
    assert last["type"] == "end" and last["tokens_out"] == 8


@needs_llama
def test_both_backends_read_the_same_file_alike(tiny_model):
    ct = load_backend("ctransformers", str(tiny_model), LoadOptions(threads=1))
    lc = load_backend("llama-cpp", str(tiny_model), LoadOptions(threads=1))
    text = "the data model 😀 漢字"
    assert ct.tokenize(text) == lc.tokenize(text)
    assert ct.context_length == lc.context_length == 512
    prompt = ct.tokenize("import queue")

    def greedy(backend, n=12):
        out = []
        for token in DirectDecoder(backend).generate(prompt, SamplingParams.greedy()):
            out.append(token)
            if len(out) == n:
                break
        return out

    # Same weights, same sampler: the first greedy tokens agree (float differences may show later).
    assert greedy(ct)[:4] == greedy(lc)[:4]
    wide = ("😀漢字🎉한국어" * 1000)[:5000]
    assert lc.detokenize(lc.tokenize(wide)[1:]) == b" " + wide.encode()
