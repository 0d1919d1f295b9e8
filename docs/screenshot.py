"""Remake docs/screenshot.png: the page at / while the demo model streams a job.

    make screenshot            # = .venv/bin/python docs/screenshot.py [--out docs/screenshot.png]

Starts the real stack (embedded Redis, the API under gunicorn, one worker on
models/demo.gguf) in a temporary directory, submits `def fibonacci(n):` from
the page in headless Chromium, and saves the page while the job runs.

The demo model writes about 1,800 tokens/s on two CPU cores, so a whole job
is over in a fraction of a second: too quick to catch mid-stream. Once the
page shows enough text, the worker process is paused (SIGSTOP) for the moment
of the screenshot, which holds everything as it was at that instant (the job
`running`, the worker `busy`), then resumed; the job finishes normally. The
pause stays far below the 8 s after which the reaper would call the job lost.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inferq import demo_model  # noqa: E402
from inferq.embedded_redis import free_port  # noqa: E402
from inferq.stack import Stack, WorkerArgs  # noqa: E402

PROMPT = "def fibonacci(n):"
MIN_CHARS = 350  # enough code to read, still short of the job's end (about 1,400 characters)
TRIES = 5  # a try fails when the job ended before the pause landed


def running_snapshot(page) -> dict:
    return page.evaluate("""() => {
      const job = JSON.parse(sessionStorage.getItem('inferq-recent'))[0];
      const row = document.querySelector(`#jobs tr[data-job='${job}']`);
      const w = document.querySelector("#workers tr[data-model='demo']");
      return {job, status: document.querySelector('#status').textContent,
              row: row ? row.dataset.state : null, worker: w ? w.dataset.state : null,
              workerJobs: w ? w.dataset.jobs : ''};
    }""")


def submit(page, prompt: str, max_tokens: int) -> None:
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", "0")
    page.click("#submit")


NEWEST = "JSON.parse(sessionStorage.getItem('inferq-recent') || '[]')[0]"


def capture(page, worker_pid: int, out: Path) -> bool:
    before = page.evaluate(NEWEST)
    submit(page, PROMPT, 480)  # the demo model's context is 512 tokens
    page.wait_for_function(f"(before) => {NEWEST} !== before", arg=before)
    # Enough text, or the job already over (then this try misses and another one is made).
    page.wait_for_function(f"() => document.querySelector('#output').textContent.length >= {MIN_CHARS} || "
                           f"document.querySelector(`#jobs tr[data-job='${{{NEWEST}}}']`)?.dataset.state "
                           "=== 'finished'", timeout=30000)
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)  # let the page take in what was already sent, and its workers fetch answer
        snap = running_snapshot(page)
        ok = snap["row"] == "running" and snap["worker"] == "busy" and snap["job"] in snap["workerJobs"]
        if ok:
            page.screenshot(path=str(out), full_page=True)
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    page.wait_for_function("() => document.querySelector('#status').textContent === 'finished'", timeout=30000)
    print(f"{'saved' if ok else 'missed (the job ended first)'}: {snap}", file=sys.stderr)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    data = Path(tempfile.mkdtemp(prefix="inferq-shot-"))
    stack = Stack([WorkerArgs(demo_model.NAME, str(demo_model.path()), threads=1)], port=free_port(),
                  data_dir=data)
    try:
        stack.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium,
                                         args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()
            page.goto(stack.api_url + "/")
            page.wait_for_function("() => [...document.querySelectorAll('#model option')]"
                                   ".some(o => o.value === 'demo' && !o.disabled)")
            # One short job first, so the recent-jobs table, the worker's tok/s and the narration
            # have something in them.
            submit(page, "import ", 24)
            page.wait_for_selector("#jobs tr[data-state='finished']", timeout=30000)
            pid = stack.children[f"worker {demo_model.NAME}"].pid
            ok = any(capture(page, pid, args.out) for _ in range(TRIES))
            browser.close()
    finally:
        stack.stop()
        shutil.rmtree(data, ignore_errors=True)
    if not ok:
        print(f"no screenshot: the job ended before the pause {TRIES} times", file=sys.stderr)
        return 1
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
