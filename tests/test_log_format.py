"""A stop-and-drain upgrade across the job log's layout: a worker refuses to start beside the old one."""
import json
import subprocess
import sys
import time

from queue_schema import keys
from queue_schema.lifecycle import log_format
from queue_schema.records import WorkerInfo
from tests.conftest import ROOT


def start_refused(redis_url: str, model_path) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "inferq", "worker", "--model", f"upgrade={model_path}",
                           "--threads", "1", "--redis-url", redis_url],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors


def test_a_worker_refuses_to_start_beside_a_worker_of_the_old_layout(r, redis_url, tiny_model):
    # The record an older worker writes: the same fields, no log_format.
    old = WorkerInfo(id="old-worker-1", host="h", pid=1, model="upgrade", backend="llama-cpp").model_dump()
    del old["log_format"]
    r.set(keys.worker("old-worker-1"), json.dumps(old))
    r.zadd(keys.WORKERS, {"old-worker-1": time.time()})
    try:
        errors = start_refused(redis_url, tiny_model)
        assert "old-worker-1" in errors[0] and "stop-and-drain" in errors[0]
    finally:
        r.zrem(keys.WORKERS, "old-worker-1")
        r.delete(keys.worker("old-worker-1"))
    log_format.check(r)  # gone: nothing stands in the way


def refused_while_open(r, redis_url, tiny_model, job: str, log_key: str, fields: dict, entry_id: str) -> None:
    """A worker refuses to start while ``job`` is open with this log entry, and starts once it is gone."""
    r.xadd(log_key, fields, id=entry_id)
    r.zadd(keys.OPEN_JOBS, {job: 1})
    try:
        errors = start_refused(redis_url, tiny_model)
        assert "old layout" in errors[0] and job in errors[0]
    finally:
        r.zrem(keys.OPEN_JOBS, job)
        r.delete(log_key)
    log_format.check(r)


def test_a_worker_refuses_to_start_while_jobs_of_the_old_layout_are_open(r, redis_url, tiny_model):
    job = "old-layout-job"
    refused_while_open(r, redis_url, tiny_model, job, keys.job_events(job),
                       {"e": json.dumps({"job_id": job, "seq": 0, "type": "queued"})}, "0-1")


def test_a_worker_refuses_to_start_while_an_open_jobs_log_is_under_its_old_name(r, redis_url, tiny_model):
    """Log format 3 put the job id in the log's name as a hash tag: a log format 2 wrote is not found under
    the new name, so its open job would lose its history."""
    job = "format-2-job"
    refused_while_open(r, redis_url, tiny_model, job, keys.old_job_events(job),
                       {"t": "queued", "e": json.dumps({"job_id": job, "seq": 0, "type": "queued"})}, "1-0")
