"""GPU options as a CPU-only host sees them: clear one-line refusals, never a crash or a hang.

The GPU paths themselves (offload, NVML VRAM) need a device; CI has none.
"""
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from worker import gpu


def inferq(*args):
    return subprocess.run([sys.executable, "-m", "inferq", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def one_line(proc, *needles):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert any(n in errors[0] for n in needles), errors[0]


def has_gpu():
    try:
        return gpu.count() > 0
    except gpu.GPUError:
        return False


@pytest.mark.skipif(has_gpu(), reason="this host has a GPU")
def test_worker_asked_for_a_gpu_on_a_host_without_one(tiny_model, redis_url):
    one_line(inferq("worker", "--model", f"g={tiny_model}", "--device", "cuda:0", "--redis-url", redis_url),
             "no NVIDIA GPU", "inferq[cuda]")


@pytest.mark.skipif(has_gpu(), reason="this host has a GPU")
def test_up_with_gpus_on_a_host_without_one(tiny_model):
    one_line(inferq("up", "--model", f"g={tiny_model}", "--gpus", "all"), "no NVIDIA GPU", "inferq[cuda]")


def test_a_bad_device_name_is_refused(tiny_model, redis_url):
    one_line(inferq("worker", "--model", f"g={tiny_model}", "--device", "gpu0", "--redis-url", redis_url),
             "--device must be cpu or cuda:N")


def test_device_parsing_and_cpu_vram():
    assert gpu.parse_device("cpu") is None and gpu.parse_device("cuda:3") == 3
    with pytest.raises(gpu.GPUError):
        gpu.parse_device("cuda:")
    assert gpu.process_vram_bytes(None) == 0


def test_loading_is_narrated_with_the_file_size(client, worker_factory, tiny_model):
    from api.extensions import resources

    worker_factory("narrated-load", tiny_model)
    with client.application.app_context():
        story = [e for e in resources().eventlog.recent_narration(200) if e.target == "narrated-load"]
    actions = [e.action for e in story]
    assert actions.index("loading") < actions.index("load")
    assert "MB" in story[actions.index("loading")].human
