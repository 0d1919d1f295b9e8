"""Submit -> Redis -> worker -> event log -> SSE, with a real worker process."""
import json
import threading
import time

import requests

from inferq.client import Client
from tests.conftest import wait_until
from tests.helpers import events, sse_frames, submit, text_of


def run(client, model, **fields):
    job = submit(client, model=model, **fields)
    return job, events(client, job)


def test_job_streams_from_queued_to_end_and_matches_its_status(client, tiny):
    job, evts = run(client, tiny, prompt="Hello world, the data", max_tokens=32, temperature=0)
    types = [e["type"] for e in evts]
    assert types[:2] == ["queued", "started"]
    assert types[-2:] == ["narration", "end"] and evts[-2]["action"] == "finish"
    assert types.count("end") == 1 and "error" not in types
    assert [e["seq"] for e in evts] == list(range(len(evts)))
    assert all(e["job_id"] == job for e in evts)
    assert types.index("metrics") < types.index("end")
    assert {e["action"] for e in evts if e["type"] == "narration"} >= {"start", "finish"}
    end = evts[-1]
    assert end["text"] == text_of(evts)
    assert end["tokens_out"] == 32 and end["stop_reason"] == "max_tokens"
    metrics = next(e for e in evts if e["type"] == "metrics")
    assert metrics["tokens_out"] == 32 and metrics["prompt_tokens"] > 0 and metrics["tokens_per_sec"] > 0
    status = client.get(f"/v1/jobs/{job}").get_json()
    assert status["state"] == "finished"
    assert status["result"]["text"] == end["text"]
    assert status["result"]["tokens_out"] == 32
    assert status["submitted_ms"] <= status["finished_ms"]


def test_token_events_are_valid_text_with_increasing_indexes(client, tiny):
    _, evts = run(client, tiny, prompt="漢字 and emoji 😀 together", max_tokens=100, temperature=0)
    tokens = [e for e in evts if e["type"] == "token"]
    assert tokens
    for e in tokens:
        e["t"].encode("utf-8")  # would raise on a lone surrogate
        assert e["t"]
    idx = [e["i"] for e in tokens]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)


def test_greedy_decoding_repeats_exactly(client, tiny):
    a = run(client, tiny, prompt="import queue", max_tokens=40, temperature=0)[1][-1]["text"]
    b = run(client, tiny, prompt="import queue", max_tokens=40, temperature=0)[1][-1]["text"]
    assert a == b and a


def test_fixed_seed_sampling_repeats_and_seeds_matter(client, tiny):
    texts = [run(client, tiny, prompt="def model", max_tokens=40, temperature=1.0, seed=s)[1][-1]["text"]
             for s in (42, 42, 7, 8)]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) > 1


def test_late_subscriber_and_last_event_id_get_exactly_the_missing_events(client, tiny):
    job, full = run(client, tiny, prompt="stream me", max_tokens=30, temperature=0)
    assert events(client, job) == full  # a late subscriber replays the whole log
    for k in (0, 3, len(full) - 2):
        assert events(client, job, last_event_id=k) == full[k + 1:]
    assert events(client, job, last_event_id=len(full) - 1) == []


def test_reconnect_mid_stream_with_last_event_id(client, slow_worker):
    job = submit(client, model="slow", prompt="go", max_tokens=400, repetition_penalty=1.0, temperature=0)
    first = events(client, job, limit=12)
    rest = events(client, job, last_event_id=first[-1]["seq"])
    seqs = [e["seq"] for e in first + rest]
    assert seqs == list(range(len(seqs)))
    assert rest[-1]["type"] == "end"
    assert events(client, job) == first + rest


def test_two_watchers_over_http_see_identical_streams(live_api, slow_worker):
    api = Client(live_api)
    job = api.submit("watch", model="slow", max_tokens=300, temperature=0)["job_id"]
    seen: dict[int, list] = {}

    def watch(n):
        seen[n] = list(api.events(job))

    threads = [threading.Thread(target=watch, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen[0] == seen[1] == seen[2]
    assert seen[0][-1]["type"] == "end" and seen[0][-1]["tokens_out"] == 300


def test_raw_http_stream_has_sse_framing(live_api, tiny):
    job = Client(live_api).submit("curl me", model=tiny, max_tokens=5, temperature=0)["job_id"]
    with requests.get(f"{live_api}/v1/jobs/{job}/stream", stream=True, timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        body = resp.content.decode()
    assert body.startswith("retry: ")
    assert "id: 0\nevent: queued\ndata: {" in body
    assert body.rstrip().split("\n")[-1].startswith("data: {")
    assert "event: end\ndata: {" in body


def split_stop(tokens):
    """A stop string made of the end of one token and the start of the next, plus where it first occurs."""
    text = "".join(tokens)
    pos = 0
    for a, b in zip(tokens, tokens[1:]):
        pos += len(a)
        if a[-1:].isalnum() and b[:1].isalnum():
            stop = a[-1] + b[:1]
            first = text.find(stop)
            if first > 0:
                return stop, first
    # The samples are greedy decodes of the seeded test model: the same every run, never a reason to skip.
    raise AssertionError(f"no alphanumeric token boundary in the sample: {tokens!r}")


def test_stop_strings_split_across_tokens_never_leak(client, tiny):
    _, base = run(client, tiny, prompt="the data and the model", max_tokens=120, temperature=0, repetition_penalty=1.0)
    tokens = [e["t"] for e in base if e["type"] == "token"]
    stop, first = split_stop(tokens)
    _, evts = run(client, tiny, prompt="the data and the model", max_tokens=120, temperature=0,
                  repetition_penalty=1.0, stop=[stop])
    end = evts[-1]
    assert end["stop_reason"] == "stop_sequence"
    assert end["text"] == "".join(tokens)[:first]
    assert text_of(evts) == end["text"] and stop not in text_of(evts)


def test_single_token_stop_string(client, tiny):
    _, base = run(client, tiny, prompt="queue worker", max_tokens=60, temperature=0)
    tokens = [e["t"] for e in base if e["type"] == "token"]
    stop = next(t for t in tokens[3:] if t.strip() and "\ufffd" not in t)
    _, evts = run(client, tiny, prompt="queue worker", max_tokens=60, temperature=0, stop=[stop])
    assert evts[-1]["stop_reason"] == "stop_sequence"
    assert stop not in evts[-1]["text"]
    assert evts[-1]["text"] == "".join(tokens)[: "".join(tokens).find(stop)]


def test_wide_prompt_of_5000_characters_is_refused_cleanly_and_the_worker_lives(client, tiny):
    wide = ("😀漢字🎉한국어ß∑" * 1000)[:5000]
    _, evts = run(client, tiny, prompt=wide, max_tokens=16)
    assert evts[-1]["type"] == "error"
    assert evts[-1]["code"] == "CONTEXT_LENGTH_EXCEEDED"
    assert "context" in evts[-1]["message"] and wide[:20] not in evts[-1]["message"]
    job = evts[0]["job_id"]
    assert client.get(f"/v1/jobs/{job}").get_json()["state"] == "failed"
    _, after = run(client, tiny, prompt="still alive?", max_tokens=8, temperature=0)
    assert after[-1]["type"] == "end" and after[-1]["tokens_out"] == 8


def test_chat_messages_use_the_fallback_template(client, tiny):
    _, evts = run(client, tiny, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert evts[-1]["type"] == "end" and evts[-1]["tokens_out"] == 4


def test_metadata_is_echoed_in_the_result(client, r, tiny):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    job, _ = run(client, tiny, prompt="meta", max_tokens=2, metadata={"user": "u1", "n": 3})
    assert client.get(f"/v1/jobs/{job}").get_json()["result"]["metadata"] == {"user": "u1", "n": 3}
    # RQ keeps the job's summary as its result (rq-dashboard renders it): never user text or metadata.
    result = wait_until(lambda: Job.fetch(job, connection=r, serializer=JSONSerializer).return_value(),
                        what="RQ's stored result")
    assert result["tokens_out"] == 2 and "metadata" not in result and "text" not in result


def test_cancel_queued_then_running(client, slow_worker):
    running = submit(client, model="slow", prompt="long", max_tokens=3500, repetition_penalty=1.0, temperature=0)
    waiting = submit(client, model="slow", prompt="queued", max_tokens=10)
    assert events(client, running, until="token")[-1]["type"] == "token"

    resp = client.delete(f"/v1/jobs/{waiting}")
    assert resp.status_code == 200 and resp.get_json()["state"] == "cancelled"
    assert [e["type"] for e in events(client, waiting)] == ["queued", "end"]
    assert events(client, waiting)[-1]["stop_reason"] == "cancelled"
    assert client.get(f"/v1/jobs/{waiting}").get_json()["state"] == "cancelled"

    t0 = time.monotonic()
    resp = client.delete(f"/v1/jobs/{running}")
    assert resp.status_code == 202 and resp.get_json()["state"] == "cancelling"
    evts = events(client, running)
    elapsed = time.monotonic() - t0
    end = evts[-1]
    assert end["type"] == "end" and end["stop_reason"] == "cancelled"
    assert 0 < end["tokens_out"] < 3500
    assert end["text"] == text_of(evts)
    assert elapsed < 5
    assert client.get(f"/v1/jobs/{running}").get_json()["state"] == "cancelled"
    assert client.delete(f"/v1/jobs/{running}").status_code == 409
    # The worker is free again.
    job = submit(client, model="slow", prompt="next", max_tokens=3, temperature=0)
    assert events(client, job)[-1]["tokens_out"] == 3


def test_queue_position_is_reported_while_waiting(client, r, worker_factory, tiny_model):
    import signal

    w = worker_factory("paused", tiny_model)
    w.proc.send_signal(signal.SIGSTOP)
    try:
        # If the stopped worker sits in BLPOP, Redis hands it the first job; if not, it stays queued.
        blocker = submit(client, model="paused", prompt="first", max_tokens=2)
        time.sleep(0.3)
        ahead = r.llen("rq:queue:inferq.paused.normal")  # 1 if the blocker is still queued, else 0
        jobs = [submit(client, model="paused", prompt=f"p{i}", max_tokens=2) for i in range(3)]
        high = submit(client, model="paused", prompt="vip", max_tokens=2, priority="high")
        positions = [client.get(f"/v1/jobs/{j}").get_json()["position"] for j in jobs + [high]]
        assert positions == [ahead + 1, ahead + 2, ahead + 3, 0]
        assert events(client, jobs[2], limit=1)[0]["position"] == ahead + 2
        assert all(client.get(f"/v1/jobs/{j}").get_json()["state"] == "queued" for j in jobs)
    finally:
        w.proc.send_signal(signal.SIGCONT)
    for j in [blocker] + jobs + [high]:
        assert events(client, j)[-1]["type"] == "end"


def test_keep_alive_comments_while_a_job_waits(live_api, worker_factory, tiny_model):
    import signal

    w = worker_factory("sleepy", tiny_model)
    w.proc.send_signal(signal.SIGSTOP)
    try:
        api = Client(live_api)
        api.submit("blocker", model="sleepy", max_tokens=2)  # may be swallowed by the stopped BLPOP
        job = api.submit("wait", model="sleepy", max_tokens=2)["job_id"]
        seen = b""
        with requests.get(f"{live_api}/v1/jobs/{job}/stream", stream=True, timeout=10) as resp:
            deadline = time.monotonic() + 5
            for chunk in resp.iter_content(chunk_size=None):
                seen += chunk
                if b": keep-alive" in seen or time.monotonic() > deadline:
                    break
        assert b"event: queued" in seen and b": keep-alive" in seen
    finally:
        w.proc.send_signal(signal.SIGCONT)
    assert list(Client(live_api).events(job))[-1]["type"] == "end"


def test_a_job_the_worker_cannot_read_still_ends_its_stream(client, r, tiny):
    """Enqueued past the API (an old client, a hand-made job): the worker answers with an error event."""
    from queue_schema.events import Queued
    from queue_schema.lifecycle import admission
    from queue_schema.lifecycle import views as job_contract

    job_id = admission.new_job_id()
    queue = job_contract.queue(r, tiny, "normal")
    from api.extensions import resources

    with client.application.app_context():
        resources().eventlog.append(Queued(job_id=job_id, seq=0, position=0, queue=queue.name))
    queue.enqueue_call(admission.INFER_FUNC, kwargs={"payload": {"operation": "infer", "model": tiny,
                                                                    "prompt": None, "max_tokens": "x"}},
                       job_id=job_id, meta={"model": tiny, "priority": "normal"})
    last = events(client, job_id)[-1]
    assert last["type"] == "error" and last["code"] == "INVALID_REQUEST"
    assert client.get(f"/v1/jobs/{job_id}").get_json()["state"] == "failed"


def test_more_watchers_than_the_api_has_redis_connections(live_api, worker_factory, tiny_model):
    """150 streams on one job through one API process, whose Redis pool holds 64: all complete and identical."""
    import signal

    w = worker_factory("crowd", tiny_model)
    w.proc.send_signal(signal.SIGSTOP)
    api = Client(live_api, timeout=30)
    results: dict[int, list] = {}
    try:
        api.submit("blocker", model="crowd", max_tokens=2)
        job = api.submit("crowd", model="crowd", max_tokens=12, temperature=0)["job_id"]

        def watch(n):
            results[n] = [e["seq"] for e in api.events(job, reconnects=0)]

        threads = [threading.Thread(target=watch, args=(n,), daemon=True) for n in range(150)]
        for t in threads:
            t.start()
        time.sleep(2)
    finally:
        w.proc.send_signal(signal.SIGCONT)
    for t in threads:
        t.join(60)
    assert len(results) == 150
    first = results[0]
    assert first == list(range(len(first))) and all(r == first for r in results.values())


def test_a_client_ahead_of_the_log_is_told_to_read_it_again(client, tiny):
    """After a failover the new master may have lost events a client saw: resuming past the log's end must
    end the stream, not wait for seqs that will never come again, and must not go on from the client's seq
    (what it read may be of a run the log lost): one restart marker, then the stream ends."""
    job = submit(client, model=tiny, prompt="ahead", max_tokens=3, temperature=0)
    evts = events(client, job)
    frames = sse_frames(client, job, last_event_id=evts[-1]["seq"] + 5)
    assert [(f["event"], f.get("id")) for f in frames] == [("restart", None)]
    marker = json.loads(frames[0]["data"])
    assert marker["log_end"] == evts[-1]["seq"] + 1 and marker["last_event_id"] == evts[-1]["seq"] + 5
    assert events(client, job, last_event_id=evts[-1]["seq"]) == []


def test_a_long_log_is_replayed_in_pages(client, r):
    """An embed job's log can be ~11 MB: a stream connecting to it reads the log a page at a time (it read
    it whole, once per connect)."""
    import uuid

    from api import relay
    from api.relay import LOG_PAGE
    from queue_schema import keys
    from queue_schema.events import End, Queued, Token
    from queue_schema.lifecycle.eventlog import EventLog

    job = uuid.uuid4().hex
    log = EventLog(r)
    n = 3 * LOG_PAGE + 10
    log.append_many([Queued(job_id=job, seq=0, position=0, queue="q")] +
                    [Token(job_id=job, seq=i, t="x", i=i - 1) for i in range(1, n)] +
                    [End(job_id=job, seq=n, tokens_out=n - 1, decode_time_ms=1, stop_reason="eos", text="")])
    r.hset(keys.job_info(job), "tenant", "anonymous")
    assert [e["seq"] for e in events(client, job)] == list(range(n + 1))
    pages = list(relay._log_pages(log, job, -1))
    assert [len(frames) for frames, _, _ in pages] == [LOG_PAGE, LOG_PAGE, LOG_PAGE, 11]
    assert [done for _, _, done in pages] == [False, False, False, True]
