"""Any text survives the trip: worker events -> Redis -> relay -> SSE -> Python client and Chromium.

Token texts are drawn by hypothesis from all of Unicode (surrogates aside:
they cannot be UTF-8), with the characters that break line-based SSE readers
mixed in on purpose: U+2028, U+2029, U+0085, CR, LF, NUL.
"""
import json
import os
import random
import uuid

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from inferq.client import Client
from queue_schema.lifecycle.eventlog import EventLog
from tests.conftest import CHROMIUM
from worker.publisher import EventPublisher, JobEmitter

TRICKY = "\u2028\u2029\u0085\r\n\x00\r\n"
texts = st.lists(st.text(alphabet=st.one_of(st.characters(exclude_categories=["Cs"]), st.sampled_from(TRICKY)),
                         min_size=1, max_size=12), min_size=1, max_size=6)


def random_pieces(rng: random.Random) -> list[str]:
    """Up to 6 pieces of any code point but surrogates, a third of them from TRICKY."""
    def char():
        if rng.random() < 0.33:
            return rng.choice(TRICKY)
        c = rng.randrange(0x110000 - 0x800)
        return chr(c if c < 0xD800 else c + 0x800)
    return ["".join(char() for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 6))]


def emit_job(redis_url: str, pieces: list[str]) -> str:
    """Write a job's whole stream with the worker's own emitter and publisher."""
    job_id = f"sse-{uuid.uuid4().hex}"
    publisher = EventPublisher(EventLog(redis.Redis.from_url(redis_url)), writer="")  # no lease: unowned
    emitter = JobEmitter(job_id, 0)
    publisher.put(emitter.make("queued", position=0, queue="inferq.sse.normal"))
    publisher.put(emitter.make("started", model="sse", worker="test", queue_wait_ms=0))
    for i, piece in enumerate(pieces):
        publisher.put(emitter.make("token", t=piece, i=i))
    publisher.put(emitter.make("end", tokens_out=len(pieces), decode_time_ms=1, stop_reason="max_tokens",
                               text="".join(pieces)))
    assert publisher.flush(10)
    return job_id


@settings(max_examples=60, deadline=None)
@given(pieces=texts)
def test_python_client_reads_back_exactly_what_the_worker_wrote(live_api, redis_url, pieces):
    job_id = emit_job(redis_url, pieces)
    events = list(Client(live_api).events(job_id))
    assert [e["t"] for e in events if e["type"] == "token"] == pieces
    assert events[-1]["type"] == "end" and events[-1]["text"] == "".join(pieces)
    assert [e["seq"] for e in events] == list(range(len(pieces) + 3))


def test_a_line_separator_is_escaped_on_the_wire(live_api, redis_url):
    import requests

    job_id = emit_job(redis_url, ["a\u2028b", "c\u0085d\u2029"])
    body = requests.get(f"{live_api}/v1/jobs/{job_id}/stream", timeout=10).content.decode()
    assert "\u2028" not in body and "\u0085" not in body and "\\u2028" in body
    data = [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: ")]
    assert [d["t"] for d in data if d["type"] == "token"] == ["a\u2028b", "c\u0085d\u2029"]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed (make test installs it)")
def test_chromium_eventsource_reads_back_exactly_what_the_worker_wrote(live_api, redis_url, browser):
    cases = [random_pieces(random.Random(n)) for n in range(25)] + [list(TRICKY), ["x\u2028y\u2029z\u0085"]]
    jobs = {emit_job(redis_url, pieces): pieces for pieces in cases}
    page = browser.new_page()
    try:
        page.goto(live_api + "/health")
        got = page.evaluate("""async (jobs) => {
            const read = (id) => new Promise((resolve, reject) => {
                const src = new EventSource(`/v1/jobs/${id}/stream`), tokens = [];
                src.addEventListener('token', (m) => tokens.push(JSON.parse(m.data).t));
                src.addEventListener('end', (m) => { src.close(); resolve([tokens, JSON.parse(m.data).text]); });
                src.onerror = () => { src.close(); reject(new Error('stream broke for ' + id)); };
            });
            const out = {};
            for (const id of jobs) out[id] = await read(id);
            return out;
        }""", list(jobs))
    finally:
        page.close()
    for job_id, pieces in jobs.items():
        assert got[job_id] == [pieces, "".join(pieces)], job_id
