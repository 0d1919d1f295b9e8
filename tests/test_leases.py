"""Leases, fencing and the reaper, broken for real: SIGKILL, SIGSTOP, a frozen Redis, random kills."""
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests
from rq import Queue
from rq.serializers import JSONSerializer

from api import create_app
from inferq.client import Client
from inferq.embedded_redis import EmbeddedRedis
from queue_schema import keys
from queue_schema.events import End, Queued, Token
from queue_schema.lifecycle import leases, registry, scripts
from queue_schema.lifecycle import reaper as reaper_mod
from queue_schema.lifecycle.eventlog import Appended, EventLog
from queue_schema.lifecycle.reaper import Reaper
from tests.conftest import start_worker, wait_until
from tests.helpers import events, stopped, submit, text_of

LONG = dict(temperature=0, repetition_penalty=1.0)


def runs_of(evts):
    return [e["worker"] for e in evts if e["type"] == "started"]


def assert_one_clean_stream(evts):
    assert [e["seq"] for e in evts] == list(range(len(evts)))
    assert [e["type"] for e in evts].count("end") + [e["type"] for e in evts].count("error") == 1
    assert evts[-1]["type"] in ("end", "error")


def take(r, job: str, owner: str, new_owner: str) -> str:
    """``new_owner``'s take of ``job`` from ``owner`` ("" for a job nobody holds), as the reaper's and the
    intake's takes do: a lease of a new generation, and its fence in the log. The lease owner string."""
    if owner == "":
        r.hset(keys.job_lease(job), "owner", "")
    return scripts.load("lease_take_over")(r, keys={"lease": keys.job_lease(job)},
                                             args={"id": job, "owner": owner, "new_owner": new_owner, "apart": 0}).decode()


def test_a_write_by_any_take_but_the_last_is_refused(r):
    log, job = EventLog(r), "fence-test"
    r.hset(keys.rq_job(job), "status", "queued")
    log.append(Queued(job_id=job, seq=0, position=0, queue="q"))
    first = take(r, job, "", "worker-a")
    second = take(r, job, first, "worker-a")  # the same worker took its job again: a writer of its own
    try:
        assert log.append(Token(job_id=job, seq=1, t="x", i=0), writer=first) == Appended.FENCED
        assert log.append(Token(job_id=job, seq=1, t="x", i=0)) == Appended.FENCED  # the API, unowned
        assert log.append(Token(job_id=job, seq=1, t="a", i=0), writer=second) == Appended.OK
        # The same event again (a retried batch) is a duplicate, not a second event.
        assert log.append(Token(job_id=job, seq=1, t="a", i=0), writer=second) == Appended.OK
        # The old take is refused past the new one's seqs too: the fence is the log's order, not a seq.
        assert log.append(Token(job_id=job, seq=2, t="y", i=1), writer=first) == Appended.FENCED
        # A terminal event is checked against the log's end: a gap is refused.
        end = End(job_id=job, seq=5, tokens_out=1, decode_time_ms=1, stop_reason="eos", text="a")
        assert log.append(end, writer=second) == Appended.GAP
        assert [e.seq for e in log.replay(job)] == [0, 1] and log.replay(job)[1].t == "a"
        # Once it ended nothing follows, not even from the take that ended it.
        assert log.append(end.model_copy(update={"seq": 2}), writer=second) == Appended.OK
        # The same end again (its reply was lost): written, not refused as closed.
        assert log.append(end.model_copy(update={"seq": 2}), writer=second) == Appended.OK
        assert log.append(Token(job_id=job, seq=3, t="b", i=1), writer=second) == Appended.CLOSED
        assert [e.type for e in log.replay(job)] == ["queued", "token", "end"]
    finally:
        r.delete(keys.job_lease(job), keys.job_events(job), keys.rq_job(job))


def test_a_log_of_two_takes_replays_from_any_seq(client, r):
    """Entry ids lead with the take's generation, seqs run on across takes: a stream resumed from any seq
    gets exactly the events after it, the second run's ``started`` included, and the take's fences never."""
    from queue_schema.events import Started

    log, job = EventLog(r), "two-takes-" + __import__("uuid").uuid4().hex[:6]
    r.hset(keys.rq_job(job), "status", "queued")
    log.append(Queued(job_id=job, seq=0, position=0, queue="q"))
    first = take(r, job, "", "worker-a")
    second = None
    try:
        started = dict(model="m", worker="worker-a", queue_wait_ms=1)
        assert log.append_many([Started(job_id=job, seq=1, run=1, **started), Token(job_id=job, seq=2, t="a", i=0)],
                               first) == {job: Appended.OK}
        second = take(r, job, first, "worker-a")
        end = End(job_id=job, seq=5, tokens_out=1, decode_time_ms=1, stop_reason="eos", text="b")
        assert log.append_many([Started(job_id=job, seq=3, run=2, **started), Token(job_id=job, seq=4, t="b", i=0),
                                end], second) == {job: Appended.OK}
        whole = [(e["seq"], e["type"]) for e in events(client, job)]
        assert whole == [(0, "queued"), (1, "started"), (2, "token"), (3, "started"), (4, "token"), (5, "end")]
        for after in range(-1, 6):
            assert [(e["seq"], e["type"]) for e in events(client, job, last_event_id=after)] == \
                [x for x in whole if x[0] > after]
    finally:
        r.zrem(keys.SETTLING, job)
        r.delete(keys.job_lease(job), keys.job_events(job), keys.rq_job(job))


def test_a_take_that_gave_its_job_back_is_fenced_at_once(r):
    """A give-back (a worker's, or the reaper's requeue) fences the giving take in the same step: while the
    job waits for its next take, the one that gave it back cannot write into its log."""
    log, job = EventLog(r), "give-back-" + __import__("uuid").uuid4().hex[:6]
    r.hset(keys.rq_job(job), "status", "queued")
    log.append(Queued(job_id=job, seq=0, position=0, queue="q"))
    held = take(r, job, "", "worker-a")
    try:
        assert log.append(Token(job_id=job, seq=1, t="a", i=0), writer=held) == Appended.OK
        assert leases.Leases(r).requeue(job, held, "inferq.m.normal", "m")
        assert log.append(Token(job_id=job, seq=2, t="b", i=1), writer=held) == Appended.FENCED
        assert [e.seq for e in log.replay(job)] == [0, 1] and log.next_seq(job) == 2
    finally:
        r.delete(keys.job_lease(job), keys.job_events(job), keys.rq_job(job), keys.rq_queue("inferq.m.normal"),
                 keys.queue_ring("inferq.m.normal"), keys.model_wake("m"))


def test_a_write_redis_cannot_take_is_an_error_to_retry_not_an_event_written(own_redis):
    """Out of memory (or a read-only replica) is not a refused id: the append raises, and the publisher keeps
    the events and retries, instead of counting them written."""
    client = redis.Redis.from_url(own_redis.url)
    log, job = EventLog(client), "oom-" + __import__("uuid").uuid4().hex[:6]
    client.hset(keys.rq_job(job), "status", "queued")
    log.append(Queued(job_id=job, seq=0, position=0, queue="q"))
    held = take(client, job, "", "worker-a")
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.ResponseError):
            log.append(Token(job_id=job, seq=1, t="a", i=0), writer=held)
    finally:
        client.config_set("maxmemory", 0)
    assert log.append(Token(job_id=job, seq=1, t="a", i=0), writer=held) == Appended.OK
    assert [e.seq for e in log.replay(job)] == [0, 1]


def test_the_only_worker_killed_mid_stream_ends_worker_lost_within_15_s(live_api, worker_factory, slow_model):
    """No other worker of the model is alive: the API process's reaper notices."""
    victim = worker_factory("lonely", slow_model, "--parallel", "2")
    api = Client(live_api)
    job = api.submit("busy", model="lonely", max_tokens=3000, **LONG)["job_id"]
    seen = []
    for e in api.events(job):
        seen.append(e)
        if e["type"] == "token":
            break
    victim.proc.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    rest = list(api.events(job, last_event_id=seen[-1]["seq"]))
    assert time.monotonic() - t0 < 15
    evts = seen + rest
    assert_one_clean_stream(evts)
    assert evts[-1]["code"] == "WORKER_LOST" and evts[-1]["retriable"]
    assert api.status(job)["state"] == "failed"


@pytest.fixture()
def own_redis(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    yield server
    if server.process and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
    server.stop()


@pytest.mark.slow
def test_a_redis_freeze_longer_than_any_timeout_kills_no_live_job(tmp_path, own_redis, slow_model):
    """SIGSTOP Redis for 15 s while a job streams with two workers up: one run, one end, every token once."""
    a = start_worker(own_redis.url, "frozen", slow_model, tmp_path, "--parallel", "2")
    b = start_worker(own_redis.url, "frozen", slow_model, tmp_path, "--parallel", "2")
    app = create_app({"REDIS_URL": own_redis.url, "TESTING": True}).test_client()
    try:
        job = submit(app, model="frozen", prompt="busy", max_tokens=3000, **LONG)
        events(app, job, until="token")
        own_redis.process.send_signal(signal.SIGSTOP)
        time.sleep(15)
        own_redis.process.send_signal(signal.SIGCONT)
        evts = events(app, job)
        assert_one_clean_stream(evts)
        assert evts[-1]["type"] == "end" and evts[-1]["tokens_out"] == 3000
        assert len(runs_of(evts)) == 1
        tokens = [e for e in evts if e["type"] == "token"]
        assert [e["i"] for e in tokens] == sorted({e["i"] for e in tokens}) and evts[-1]["text"] == text_of(evts)
        assert a.proc.poll() is None and b.proc.poll() is None
    finally:
        a.stop(signal.SIGKILL)
        b.stop(signal.SIGKILL)


@pytest.mark.slow
def test_a_frozen_worker_loses_its_job_and_its_late_events_are_refused(client, r, worker_factory, slow_model):
    frozen = worker_factory("thaw", slow_model, "--parallel", "2")
    job = submit(client, model="thaw", prompt="busy", max_tokens=3000, **LONG)
    events(client, job, until="token")
    frozen.proc.send_signal(signal.SIGSTOP)  # alive, holding its lease, renewing nothing
    worker_factory("thaw", slow_model, "--parallel", "2")
    try:
        lost = events(client, job)
        assert lost[-1]["code"] == "WORKER_LOST"
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    # Thawed, it decodes on until its next write, which the log refuses; then it drops the job.
    # Its record may have lapsed while it was frozen: wait for a fresh one without the job.
    wait_until(lambda: any(w.pid == frozen.proc.pid and job not in w.jobs for w in registry.live_workers(r)),
               what="the thawed worker to drop the job")
    after = EventLog(r).replay(job)
    assert [e.seq for e in after] == [e["seq"] for e in lost] and after[-1].type == "error"
    assert frozen.proc.poll() is None
    assert events(client, submit(client, model="thaw", prompt="after", max_tokens=3))[-1]["type"] == "end"


@pytest.mark.slow
def test_kill_9_at_random_instants_loses_no_job(tmp_path, own_redis, slow_model):
    """200 jobs, two workers SIGKILLed at random instants and restarted: every job ends exactly once."""
    url = own_redis.url
    workers = [start_worker(url, "chaos9", slow_model, tmp_path, "--parallel", "4") for _ in range(2)]
    app = create_app({"REDIS_URL": url, "TESTING": True})
    client = app.test_client()
    rng = random.Random(9)
    ids = [submit(client, model="chaos9", prompt=f"job {i}", max_tokens=rng.randint(20, 300), **LONG)
           for i in range(200)]
    stop = threading.Event()
    kills = []

    def killer():
        while not stop.is_set() and len(kills) < 8:
            time.sleep(rng.uniform(0.2, 1.5))
            i = rng.randrange(len(workers))
            workers[i].proc.send_signal(signal.SIGKILL)
            kills.append(time.monotonic())
            workers[i] = start_worker(url, "chaos9", slow_model, tmp_path, "--parallel", "4", wait=False)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    log = EventLog(redis.Redis.from_url(url))
    try:
        wait_until(lambda: all((lambda e: e is not None and e.terminal)(log.last(j)) for j in ids),
                   timeout=120, interval=0.5, what="every job to end")
    finally:
        stop.set()
        t.join(10)
        for w in workers:
            w.stop(signal.SIGKILL)
    outcomes = {"end": 0, "WORKER_LOST": 0}
    for j in ids:
        evts = [e.model_dump() for e in log.replay(j)]
        assert_one_clean_stream(evts)
        last = evts[-1]
        outcomes["end" if last["type"] == "end" else last["code"]] += 1
        if last["type"] == "end":
            # Only the last run streamed tokens: a job that had sent one is never run again.
            last_start = max(i for i, e in enumerate(evts) if e["type"] == "started")
            assert all(e["type"] != "token" for e in evts[:last_start])
            assert last["text"] == text_of(evts)
    print(f"{len(kills)} kills: {outcomes}")
    assert len(kills) >= 3 and outcomes["end"] + outcomes["WORKER_LOST"] == len(ids)


def test_the_queue_bound_holds_exactly_under_100_concurrent_submits(live_api, worker_factory, tiny_model):
    w = worker_factory("bound10", tiny_model, "--queue-depth", "10")
    w.proc.send_signal(signal.SIGSTOP)
    try:
        body = {"operation": "infer", "model": "bound10", "prompt": "x", "max_tokens": 2}

        def post(_):
            return requests.post(f"{live_api}/v1/jobs", json=body, timeout=30).status_code

        with ThreadPoolExecutor(100) as pool:
            codes = list(pool.map(post, range(100)))
    finally:
        w.proc.send_signal(signal.SIGCONT)
    assert codes.count(202) == 10 and codes.count(503) == 90, sorted(set(codes))


def test_a_cancel_sent_while_the_listener_reconnects_still_lands(client, r, worker_factory, slow_model):
    worker_factory("relisten", slow_model, "--parallel", "2")
    job = submit(client, model="relisten", prompt="busy", max_tokens=3000, **LONG)
    events(client, job, until="token")
    # Cut every pub/sub connection and set the flag without publishing: the message is "lost".
    r.client_kill_filter(_type="pubsub")
    r.set(keys.job_cancel(job), 1, ex=60)
    last = events(client, job)[-1]
    assert last["type"] == "end" and last["stop_reason"] == "cancelled"


@pytest.fixture()
def fast_sweeps(monkeypatch):
    """The reaper's sweep looks at open jobs older than 5 s; these tests need it now."""
    monkeypatch.setattr(reaper_mod, "SWEEP_MIN_AGE_S", 0.0)


def test_a_queued_job_deleted_in_rq_ends_its_stream(client, r, worker_factory, tiny_model, fast_sweeps):
    w = worker_factory("deleted", tiny_model)
    w.proc.send_signal(signal.SIGSTOP)
    try:
        gone = submit(client, model="deleted", prompt="doomed", max_tokens=3)
        dropped = submit(client, model="deleted", prompt="cancelled in rq", max_tokens=3)
        queue = Queue(keys.queue_name("deleted", "normal"), connection=r, serializer=JSONSerializer)
        queue.fetch_job(gone).delete()  # what rq-dashboard's delete and "empty queue" do
        queue.fetch_job(dropped).cancel()
        done = dict(Reaper(r, "test-reaper").sweep())
    finally:
        w.proc.send_signal(signal.SIGCONT)
    assert done[gone] == "deleted" and done[dropped] == "cancelled"
    assert events(client, gone)[-1]["code"] == "CANCELLED"
    assert events(client, dropped)[-1]["stop_reason"] == "cancelled"
    assert client.get(f"/v1/jobs/{dropped}").get_json()["state"] == "cancelled"


@pytest.mark.slow
def test_a_second_sigterm_gives_back_what_streamed_nothing_and_loses_the_rest(client, r, worker_factory,
                                                                              small_model):
    victim = worker_factory("cold", small_model, "--parallel", "2", "--threads", "2")
    streaming = submit(client, model="cold", prompt="busy", max_tokens=1000, **LONG)
    events(client, streaming, until="token")
    # ~2,000 prompt tokens: over a second of prefill, so it has streamed nothing when the worker stops.
    prefilling = submit(client, model="cold", prompt="the data model of the queue worker " * 80, max_tokens=5,
                        temperature=0)
    wait_until(lambda: any(e["type"] == "narration" and e["action"] == "start"
                           for e in events(client, prefilling, limit=3)), interval=0.01, what="its prefill")
    victim.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: any(w.pid == victim.proc.pid and w.state == "stopping" for w in registry.live_workers(r)),
               what="the first SIGTERM to land")  # two at once would be one signal
    victim.proc.send_signal(signal.SIGTERM)
    assert victim.proc.wait(30) == 0
    lost = events(client, streaming)
    assert lost[-1]["code"] == "WORKER_LOST" and lost[-1]["retriable"]
    worker_factory("cold", small_model, "--parallel", "2", "--threads", "2")
    evts = events(client, prefilling)
    assert_one_clean_stream(evts)
    assert len(runs_of(evts)) == 2 and evts[-1]["type"] == "end" and evts[-1]["tokens_out"] == 5
    assert any(e["type"] == "narration" and e["action"] == "requeue" for e in evts)


@pytest.mark.slow
def test_a_killed_stack_ends_its_streams_when_it_comes_back(tmp_path, own_redis, slow_model):
    worker = start_worker(own_redis.url, "phoenix2", slow_model, tmp_path, "--parallel", "2")
    app = create_app({"REDIS_URL": own_redis.url, "TESTING": True}).test_client()
    job = submit(app, model="phoenix2", prompt="busy", max_tokens=3000, **LONG)
    events(app, job, until="token")
    worker.proc.send_signal(signal.SIGKILL)
    own_redis.stop()  # the whole stack goes: Redis keeps its AOF
    own_redis.start()
    # The next inferq process to come up (an API process here) reaps what nobody renews.
    reaper = Reaper(redis.Redis.from_url(own_redis.url), "test-api")
    reaper.start()
    try:
        last = events(app, job)[-1]
        # The stream ends with the terminal event; the lease goes in the settle that follows it.
        wait_until(lambda: not leases.Leases(redis.Redis.from_url(own_redis.url)).observe(),
                   what="the settle to release the lease")
    finally:
        reaper.stop()
    assert last["type"] == "error" and last["code"] == "WORKER_LOST"


def test_a_renewal_racing_the_terminal_append_is_not_a_lost_lease():
    """The terminal append releases the lease; a renewal sent with the job still held then finds it
    gone. That job is settled by the append's own result (its books closed by the worker), so the
    renewal must not drop it; a job with no terminal event yet whose lease is gone is really lost."""
    import threading

    from worker.jobs import Jobs, Record
    from worker.publisher import JobEmitter

    sent = []
    jobs = object.__new__(Jobs)  # only the records matter here
    jobs._records, jobs._lock = {}, threading.Lock()
    for job_id in ("ended", "running"):
        emitter = JobEmitter(job_id, 0)
        sent.append(emitter.make("token", t="a", i=0))
        jobs._records[job_id] = Record(job=None, emitter=emitter)
    sent.append(jobs._records["ended"].emitter.make("end", text="a", tokens_out=1, decode_time_ms=1,
                                                    stop_reason="eos"))
    assert jobs.really_lost(["ended", "running", "gone"]) == ["running"]
    assert [e.type for e in sent] == ["token", "token", "end"]


def test_a_log_ttl_is_renewed_by_the_first_write_that_lands_not_at_every_step(r):
    """The append renews a job's log TTL on its writer's first write that lands, then once per quarter TTL
    and at the end: a write refused (fenced here) leaves the renewal due."""
    job = "ttl-renewal-" + __import__("uuid").uuid4().hex[:6]
    r.hset(keys.rq_job(job), "status", "queued")
    EventLog(r, ttl_s=3600).append(Queued(job_id=job, seq=0, position=0, queue="q"))  # as admission would
    log = EventLog(r, ttl_s=3600)  # the worker's: what it renewed is its own to remember
    r.expire(keys.job_events(job), 100)  # as if it had waited in the queue most of its TTL
    stale = take(r, job, "", "worker-b")
    held = take(r, job, stale, "worker-a")
    try:
        assert log.append(Token(job_id=job, seq=1, t="x", i=0), writer=stale) == Appended.FENCED
        # The plain append sends its EXPIRE beside its XADDs, so a refused one may have renewed the log; what
        # matters is that the refusal leaves the renewal due.
        r.expire(keys.job_events(job), 100)
        assert log.append(Token(job_id=job, seq=1, t="x", i=0), writer=held) == Appended.OK
        assert r.ttl(keys.job_events(job)) > 3000  # the first write that landed renewed it
        r.expire(keys.job_events(job), 100)
        assert log.append(Token(job_id=job, seq=2, t="y", i=1), writer=held) == Appended.OK
        assert r.ttl(keys.job_events(job)) <= 100  # a quarter TTL has not passed: no EXPIRE this step
        end = End(job_id=job, seq=3, tokens_out=2, decode_time_ms=1, stop_reason="eos", text="xy")
        assert log.append(end, writer=held) == Appended.OK
        assert r.ttl(keys.job_events(job)) > 3000  # the end renews it: the log lives a TTL after it
    finally:
        r.zrem(keys.SETTLING, job)
        r.delete(keys.job_lease(job), keys.job_events(job), keys.rq_job(job))


def test_a_job_its_own_worker_lost_and_took_again_runs_once_in_the_log(client, r, worker_factory, slow_model):
    """The fencing token: the worker's heartbeat stalls (SIGSTOP) past the reaper's patience while the job is
    in prefill, the reaper gives the job back, and once the worker runs again (SIGCONT) its intake takes the
    job back. Both takes are the same worker; the lease's generation tells them apart, so the earlier take's
    writes are refused and one run's events alone reach the log."""
    w = worker_factory("retaken", slow_model, "--parallel", "2")
    job = submit(client, model="retaken", prompt="the " * 1300, max_tokens=12, **LONG)
    stream = keys.job_events(job)
    wait_until(lambda: any(b'"started"' in f.get(b"e", b"") for _, f in r.xrange(stream)), timeout=30, interval=0.005,
               what="the job to start")
    w.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: stopped(w.proc.pid), what="the worker to stop")
        assert not any(b'"token"' in f.get(b"e", b"") for _, f in r.xrange(stream)), "prefill ended before the stop"
        first_owner = r.hget(keys.job_lease(job), "owner").decode()
        reaper = Reaper(r, "fence-reaper")

        def requeued():
            reaper.tick()
            return r.hget(keys.rq_job(job), "status") == b"queued" or r.exists(keys.job_lease(job)) == 0

        wait_until(requeued, timeout=40, interval=0.5, what="the reaper to give the job back")
    finally:
        w.proc.send_signal(signal.SIGCONT)
    evts = events(client, job)
    assert_one_clean_stream(evts)
    assert evts[-1]["type"] == "end" and evts[-1]["stop_reason"] == "max_tokens"
    started = [e for e in evts if e["type"] == "started"]
    assert len(started) == 2 and started[0]["worker"] == started[1]["worker"]  # one worker, two takes
    assert started[0]["run"] == leases.generation(first_owner) < started[1]["run"]
    tokens = [e for e in evts if e["type"] == "token"]
    assert all(e["seq"] > started[-1]["seq"] for e in tokens)  # every token is the last take's
    assert [e["i"] for e in tokens] == list(range(12)) and evts[-1]["tokens_out"] == 12
    assert "".join(e["t"] for e in tokens) == evts[-1]["text"]


def test_a_second_run_in_a_log_voids_what_the_first_one_streamed(r, live_api):
    """Failover can leave a lost run's events in a log (a replica promoted without the lease's last moves):
    the next run's ``started`` names another run, and readers drop what came before it."""
    from api.openai.answers import JobResult
    from queue_schema.events import Started

    log, job = EventLog(r), "restart-marker-test"
    r.hset(keys.job_info(job), mapping={"tenant": "default", "submitted": int(time.time() * 1000)})
    evts = [Queued(job_id=job, seq=0, position=0, queue="q"),
            Started(job_id=job, seq=1, model="m", worker="w", queue_wait_ms=0, run=1),
            Token(job_id=job, seq=2, t="lost ", i=0),
            Started(job_id=job, seq=3, model="m", worker="w", queue_wait_ms=0, run=2),
            Token(job_id=job, seq=4, t="kept", i=0),
            End(job_id=job, seq=5, tokens_out=1, decode_time_ms=1, stop_reason="eos", text="kept")]
    try:
        assert log.append_many(evts) == {job: Appended.OK}
        assert Client(live_api).text(job) == "kept"
        # A client that read further than the log holds (a failover lost the rest) is told to read it again,
        # and the client does, from the start.
        api = Client(live_api)
        resp = api.session.get(f"{live_api}/v1/jobs/{job}/stream", headers={"Last-Event-ID": "9"}, timeout=10)
        assert resp.status_code == 200 and resp.text.count("event: restart") == 1 and "id:" not in resp.text
        again = list(api.events(job, last_event_id=9))
        assert again[0]["type"] == "restart" and again[0]["log_end"] == 6
        assert [e["seq"] for e in again[1:]] == list(range(6))
        result = JobResult()
        for e in evts:
            result.feed(e.model_dump(exclude_none=True))
        assert result.restarted and result.run == 2
    finally:
        r.delete(keys.job_events(job), keys.job_info(job))
