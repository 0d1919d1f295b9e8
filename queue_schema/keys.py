"""Every Redis key and channel name inferq uses, in one place.

Nothing else in the code base spells a key: call these. ``tests/test_keys.py``
pins the exact strings, because workers and API processes of different
versions share one Redis.
"""
PREFIX = "inferq"

# RQ adds its own "rq:queue:" prefix to queue names.
QUEUE_PREFIX = f"{PREFIX}."
PRIORITIES = ("high", "normal", "low")

WORKERS = f"{PREFIX}:workers"  # sorted set: worker id -> last heartbeat (epoch s)
MODELS = f"{PREFIX}:models"  # sorted set: model name -> last time a worker served it
CANCEL_CHANNEL = f"{PREFIX}:cancel"  # pub/sub: job ids to cancel cooperatively
NARRATION_CHANNEL = f"{PREFIX}:narration"  # pub/sub: every narration event, for operators
NARRATION_LOG = f"{PREFIX}:narration:log"  # stream: recent narration, for late watchers
COUNTERS = f"{PREFIX}:stats:counters"  # hash: "<counter>|<model>" -> count, for /metrics


def histogram(name: str, model: str) -> str:
    """Hash of cumulative bucket counts (plus sum and count) of one histogram for one model."""
    return f"{PREFIX}:stats:hist:{name}:{model}"


def queue_name(model: str, priority: str) -> str:
    """RQ queue name for one model and priority."""
    return f"{QUEUE_PREFIX}{model}.{priority}"


def job_events(job_id: str) -> str:
    """Redis Stream holding the job's events: the durable log."""
    return f"{PREFIX}:job:{job_id}:events"


def job_channel(job_id: str) -> str:
    """Pub/sub channel relaying the job's events live."""
    return f"{PREFIX}:job:{job_id}:live"


def job_cancel(job_id: str) -> str:
    """Flag set when a client asked to cancel the job."""
    return f"{PREFIX}:job:{job_id}:cancel"


def job_lost(job_id: str, worker_name: str) -> str:
    """Claim taken by the one reaper that handles a job lost with this worker."""
    return f"{PREFIX}:job:{job_id}:lost:{worker_name}"


def worker(worker_id: str) -> str:
    """JSON describing one live worker; expires unless heartbeats refresh it."""
    return f"{PREFIX}:worker:{worker_id}"


def model_workers(name: str) -> str:
    """Sorted set of the model's workers by last heartbeat (epoch s): a cheap live count."""
    return f"{PREFIX}:model:{name}:workers"


def model(name: str) -> str:
    """JSON describing a served model (context length, queue bound); refreshed by its workers."""
    return f"{PREFIX}:model:{name}"
