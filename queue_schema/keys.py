"""Every Redis key and channel name inferq uses, in one place.

Nothing else in the code base spells a key: call these. ``tests/test_keys.py``
pins the exact strings, because workers and API processes of different
versions share one Redis.
"""
PREFIX = "inferq"

# RQ adds its own "rq:queue:" prefix to queue names.
QUEUE_PREFIX = f"{PREFIX}."
# Interactive priorities first; "batch" (OpenAI batch lines, api.batch_store) is taken only
# when nothing interactive waits, and is outside the admission bound.
PRIORITIES = ("high", "normal", "low", "batch")
INTERACTIVE = PRIORITIES[:3]
# A tenant's own RQ queue is "<model's queue>@<tenant>": neither model nor tenant names hold "@".
TENANT_QUEUE_SEP = "@"

WORKERS = f"{PREFIX}:workers"  # sorted set: worker id -> last heartbeat (epoch s)
MODELS = f"{PREFIX}:models"  # sorted set: model name -> last time a worker served it
CANCEL_CHANNEL = f"{PREFIX}:cancel"  # pub/sub: job ids to cancel cooperatively
NARRATION_CHANNEL = f"{PREFIX}:narration"  # pub/sub: every narration event, for operators
NARRATION_LOG = f"{PREFIX}:narration:log"  # stream: recent narration, for late watchers
COUNTERS = f"{PREFIX}:stats:counters"  # hash: "<counter>|<model>" -> count, for /metrics
LEASES = f"{PREFIX}:leases"  # sorted set: job id -> when its lease was taken (ms): the running jobs
OPEN_JOBS = f"{PREFIX}:jobs:open"  # sorted set: job id -> submitted (ms), until its end is settled
SETTLING = f"{PREFIX}:jobs:settling"  # sorted set: job id -> when its log ended (ms), until its end is settled
REAPER = f"{PREFIX}:reaper"  # which process reaps lost jobs now (a short-lived lock)
JOB_INDEX = f"{PREFIX}:jobs:index"  # sorted set: job id -> submitted (µs), every tenant's (admins list it)
TENANTS = f"{PREFIX}:tenants"  # hash: limit key -> tenant name, for /metrics
TENANT_COUNTERS = f"{PREFIX}:stats:tenants"  # hash: "<counter>|<tenant>" -> count, for /metrics
WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"  # sorted set: delivery id -> when it is due (ms)
WEBHOOKS_CLAIMED = f"{PREFIX}:webhooks:claimed"  # sorted set: delivery id -> when its claim lapses (ms)
# sorted set: delivery id -> when its event happened (ms), from its first claim until it is delivered or given up
WEBHOOKS_UNDELIVERED = f"{PREFIX}:webhooks:undelivered"
# hash: the event -> delivered seconds of webhook deliveries ("b:<bound>" bucket counts and "sum"), for /metrics
WEBHOOK_DELIVERY_HIST = f"{PREFIX}:stats:hist:webhook_delivery_seconds"
BATCHES_DUE = f"{PREFIX}:batches:due"  # sorted set: batch id -> when it next needs advancing (ms)
BATCH_TENANTS = f"{PREFIX}:batches:tenants"  # set: tenants that have made batches, for /metrics
# Which store holds the job logs (INFERQ_EVENTS_URL, secrets left out; "" for this Redis), and who uses one:
# a process that names another store refuses to start (queue_schema.lifecycle.events_url).
EVENTS_STORE = f"{PREFIX}:events:store"  # string
EVENTS_USERS = f"{PREFIX}:events:users"  # sorted set: "<store>\t<process>" -> last seen (ms, the fleet clock)
BATCHES_CLAIMED = f"{PREFIX}:batches:claimed"  # sorted set: batch id -> when its claim lapses (ms)
# RQ's own names for the Redis objects it keeps; inferq's Lua scripts touch them, so they are spelled here too.
RQ_QUEUE_PREFIX = "rq:queue:"
RQ_JOB_PREFIX = "rq:job:"
RQ_QUEUES = "rq:queues"


def histogram(name: str, model: str) -> str:
    """Hash of cumulative bucket counts (plus sum and count) of one histogram for one model."""
    return f"{PREFIX}:stats:hist:{name}:{model}"


def queue_name(model: str, priority: str, tenant: str | None = None) -> str:
    """RQ queue name for one model and priority: the model's own, or one tenant's under it (fair share)."""
    base = f"{QUEUE_PREFIX}{model}.{priority}"
    return base if tenant is None else f"{base}{TENANT_QUEUE_SEP}{tenant}"


def base_queue_name(name: str) -> str:
    """The model's queue a tenant's queue belongs to (itself for a model's queue)."""
    return name.partition(TENANT_QUEUE_SEP)[0]


def queue_model(name: str) -> str:
    """The model a queue (a model's, or a tenant's under it) is for: ``queue_name``'s first part."""
    return base_queue_name(name)[len(QUEUE_PREFIX):].rpartition(".")[0]


def queue_ring(name: str) -> str:
    """List of the queues under one model queue that have jobs waiting, taken in turn (fair share)."""
    return f"{PREFIX}:ring:{base_queue_name(name)}"


# A job's log keys carry its id as a hash tag ({id}): on an events cluster (INFERQ_EVENTS_URL) the stream and
# its channel share a slot, so one script writes both.
def job_events(job_id: str) -> str:
    """Redis Stream holding the job's events: the durable log."""
    return f"{PREFIX}:job:{{{job_id}}}:events"


def job_channel(job_id: str) -> str:
    """Pub/sub channel relaying the job's events live (a shard channel on an events cluster)."""
    return f"{PREFIX}:job:{{{job_id}}}:live"


def old_job_events(job_id: str) -> str:
    """The log's name before the hash tag (log format 2): only the upgrade check looks for it."""
    return f"{PREFIX}:job:{job_id}:events"


def job_cancel(job_id: str) -> str:
    """Flag set when a client asked to cancel the job."""
    return f"{PREFIX}:job:{job_id}:cancel"


def job_settled(job_id: str) -> str:
    """Set once what hangs on the job's end has been settled (queue_schema.lifecycle.ending): the settle's
    guard, whoever calls it and however often."""
    return f"{PREFIX}:job:{job_id}:settled"


def job_info(job_id: str) -> str:
    """Hash of what inferq's scripts need to know about a job: ``tenant``, ``limit`` (its limit key),
    and optionally ``webhook`` and ``batch``."""
    return f"{PREFIX}:job:{job_id}:info"


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


def limit_queued(limit_key: str) -> str:
    """Set of the queued jobs of one limit key (api/auth.py: a tenant, a bare token, an address)."""
    return f"{PREFIX}:limit:{limit_key}:queued"


def limit_running(limit_key: str) -> str:
    """Set of the leased (running) jobs of one limit key."""
    return f"{PREFIX}:limit:{limit_key}:running"


def limit_bucket(limit_key: str) -> str:
    """Hash holding one limit key's submit token bucket (``tokens``, ``at`` ms)."""
    return f"{PREFIX}:limit:{limit_key}:bucket"


def tenant_jobs(tenant: str) -> str:
    """Sorted set: the tenant's job ids -> submitted (µs), for GET /v1/jobs."""
    return f"{PREFIX}:tenant:{tenant}:jobs"


def tenant_files(tenant: str) -> str:
    """Sorted set: the tenant's file ids -> created (ms)."""
    return f"{PREFIX}:tenant:{tenant}:files"


def tenant_batches(tenant: str) -> str:
    """Sorted set: the tenant's batch ids -> created (ms)."""
    return f"{PREFIX}:tenant:{tenant}:batches"


def tenant_open_batches(tenant: str) -> str:
    """Set of the tenant's batches not yet in a final state (bounded per tenant)."""
    return f"{PREFIX}:tenant:{tenant}:batches:open"


def idempotency(tenant: str, key_digest: str) -> str:
    """The job id (and request fingerprint) an Idempotency-Key of the tenant gave."""
    return f"{PREFIX}:tenant:{tenant}:idem:{key_digest}"


def webhook(delivery_id: str) -> str:
    """Hash of one webhook delivery: url, event type, target, attempts, the body once built."""
    return f"{PREFIX}:webhook:{delivery_id}"


def file(file_id: str) -> str:
    """Hash of one uploaded (or batch output) file: its metadata (and, written before 2026-12, its bytes)."""
    return f"{PREFIX}:file:{file_id}"


def file_content(file_id: str) -> str:
    """List of a file's bytes in pieces, in order (written and read a piece at a time)."""
    return f"{PREFIX}:file:{file_id}:content"


def batch(batch_id: str) -> str:
    """Hash of one batch: its state, counts, cursor and timestamps."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_lines(batch_id: str) -> str:
    """List of the batch's validated requests, one JSON object per input line."""
    return f"{PREFIX}:batch:{batch_id}:lines"


def batch_jobs(batch_id: str) -> str:
    """Hash: a line's index -> the job that runs it."""
    return f"{PREFIX}:batch:{batch_id}:jobs"


def batch_ended(batch_id: str) -> str:
    """List of the batch's job ids whose logs ended and whose results are not collected yet."""
    return f"{PREFIX}:batch:{batch_id}:ended"


def batch_results(batch_id: str) -> str:
    """Hash: a line's index -> its output (or error) line, once collected."""
    return f"{PREFIX}:batch:{batch_id}:results"


def split(key_function) -> tuple[str, str]:
    """The text before and after the id in the keys ``key_function`` makes, for Lua scripts that
    build a job's keys from its id (so the names are still spelled only here)."""
    marker = "\x00"
    before, _, after = key_function(marker).partition(marker)
    return before, after


# The Responses API (api/response_store.py).
def response(response_id: str) -> str:
    """Hash of one stored Responses API response (api/response_store.py): tenant, job, created_at, model, the
    request's settings it echoes and its input items; its output is the job's log."""
    return f"{PREFIX}:response:{response_id}"
