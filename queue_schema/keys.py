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
LEASES = f"{PREFIX}:leases"  # sorted set: job id -> when its lease was taken (ms): the running jobs
OPEN_JOBS = f"{PREFIX}:jobs:open"  # sorted set: job id -> submitted (ms), while its log has no terminal event
REAPER = f"{PREFIX}:reaper"  # which process reaps lost jobs now (a short-lived lock)
# RQ's own names for the Redis objects it keeps; inferq's Lua scripts touch them, so they are spelled here too.
RQ_QUEUE_PREFIX = "rq:queue:"
RQ_JOB_PREFIX = "rq:job:"
RQ_QUEUES = "rq:queues"


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


def job_lease(job_id: str) -> str:
    """Hash naming the one worker that runs the job (``owner``) and how often it renewed (``renewals``)."""
    return f"{PREFIX}:job:{job_id}:lease"


def rq_queue(name: str) -> str:
    """The Redis list RQ keeps for a queue."""
    return f"{RQ_QUEUE_PREFIX}{name}"


def rq_job(job_id: str) -> str:
    """The hash RQ keeps for a job."""
    return f"{RQ_JOB_PREFIX}{job_id}"


def model_wake(name: str) -> str:
    """List a submit pushes to, so a model's idle workers wake without polling its queues."""
    return f"{PREFIX}:model:{name}:wake"


def worker(worker_id: str) -> str:
    """JSON describing one live worker; expires unless heartbeats refresh it."""
    return f"{PREFIX}:worker:{worker_id}"


def model_workers(name: str) -> str:
    """Sorted set of the model's workers by last heartbeat (epoch s): a cheap live count."""
    return f"{PREFIX}:model:{name}:workers"


def model(name: str) -> str:
    """JSON describing a served model (context length, queue bound); refreshed by its workers."""
    return f"{PREFIX}:model:{name}"


def split(key_function) -> tuple[str, str]:
    """The text before and after the id in the keys ``key_function`` makes, for Lua scripts that
    build a job's keys from its id (so the names are still spelled only here)."""
    marker = "\x00"
    before, _, after = key_function(marker).partition(marker)
    return before, after
