"""The inferq command line: help, one-line failures, submit/status/cancel against a live API."""
import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from inferq.cli import main
from inferq.embedded_redis import free_port
from tests.conftest import ROOT, wait_until
from tests.helpers import models_at

COMMANDS = ["up", "demo", "api", "worker", "submit", "status", "cancel", "models", "make-test-model"]


def inferq(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "inferq", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def one_line_error(proc, needle):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def test_worker_with_missing_or_bad_model_fails_in_one_line(tmp_path):
    one_line_error(inferq("worker", "--model", f"m={tmp_path / 'none.gguf'}"), "model file not found")
    bad = tmp_path / "bad.gguf"
    bad.write_text("definitely not gguf")
    one_line_error(inferq("worker", "--model", f"m={bad}"), "not a GGUF file")
    one_line_error(inferq("worker", "--model", "nopath"), "NAME=PATH")


def test_worker_with_redis_unreachable_fails_in_one_line(tiny_model):
    proc = inferq("worker", "--model", f"m={tiny_model}", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    one_line_error(proc, "cannot reach Redis")


def test_worker_with_a_sentinel_url_it_cannot_use_fails_in_one_line(tiny_model):
    sentinels = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    proc = inferq("worker", "--model", f"m={tiny_model}", "--redis-url", f"redis+sentinel://:s3cret@{sentinels}/svc")
    one_line_error(proc, f"no master for 'svc' from the sentinels at {sentinels.replace(',', ', ')}")
    assert "s3cret" not in proc.stderr and len(proc.stderr.splitlines()[-1]) < 300
    one_line_error(inferq("worker", "--model", f"m={tiny_model}", "--redis-url", "redis+sentinel://127.0.0.1:1"),
                   "names no service")


def test_client_commands_with_api_unreachable_fail_in_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["submit", "hi", "--model", "x"], ["status", "abc"], ["cancel", "abc"], ["models"]):
        one_line_error(inferq("--api-url", url, *args), "cannot reach the inferq API")


@pytest.mark.usefixtures("tiny_worker")
def test_submit_streams_tokens_and_json_events(live_api):
    runner = CliRunner()
    plain = runner.invoke(main, ["--api-url", live_api, "submit", "hello", "--model", "tiny", "--max-tokens", "8",
                                 "--temperature", "0"])
    assert plain.exit_code == 0, plain.output
    as_json = runner.invoke(main, ["--api-url", live_api, "submit", "hello", "--model", "tiny", "--max-tokens",
                                   "8", "--temperature", "0", "--json"])
    evts = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert evts[0]["type"] == "queued" and evts[-1]["type"] == "end"
    # Greedy both times: the plain run printed exactly that text ("in" held for an empty one).
    assert plain.stdout == evts[-1]["text"] + "\n"
    job = evts[0]["job_id"]
    status = runner.invoke(main, ["--api-url", live_api, "status", job])
    assert json.loads(status.stdout)["state"] == "finished"
    cancel = runner.invoke(main, ["--api-url", live_api, "cancel", job])
    assert cancel.exit_code == 1 and "JOB_FINISHED" in cancel.output
    models = runner.invoke(main, ["--api-url", live_api, "models"])
    assert "tiny\tworkers=" in models.stdout
    unknown = runner.invoke(main, ["--api-url", live_api, "submit", "x", "--model", "nope"])
    assert unknown.exit_code == 1 and "MODEL_NOT_FOUND" in unknown.output


def test_make_test_model(tmp_path):
    result = CliRunner().invoke(main, ["make-test-model", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_a_model_an_earlier_up_served_shows_offline(tmp_path, tiny_model):
    """`inferq up --model small=...`, stopped, then a plain `inferq up` on the same data: Redis
    (AOF) still knows `small`, and says nobody serves it rather than listing it as a choice."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["INFERQ_DATA_DIR"] = str(tmp_path / "data")

    def up(*args):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "inferq", "--log-level", "WARNING", "up", "--port",
                                 str(port), "--threads", "1", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return proc, f"http://127.0.0.1:{port}"

    first, url = up("--model", f"small={tiny_model}")
    try:
        wait_until(lambda: models_at(url).get("small", {}).get("status") == "online", timeout=60,
                   what="the first stack")
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 0
    second, url = up()
    try:
        wait_until(lambda: models_at(url).get("demo", {}).get("status") == "online", timeout=60,
                   what="the second stack")
        small = models_at(url)["small"]
        assert small["status"] == "offline" and small["workers"] == 0 and small["last_seen"] > 0
    finally:
        second.send_signal(signal.SIGINT)
        assert second.wait(60) == 0
