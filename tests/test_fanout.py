"""One pub/sub connection per API process: many streams, one subscription, nothing missed."""
import json
import signal
import threading
import time
import uuid

import pytest
import redis
import requests

from api import fanout
from api.fanout import ChannelHub
from inferq.client import parse_sse
from queue_schema import keys
from tests.conftest import wait_until


def numsub(r, channel: str) -> int:
    return dict(r.pubsub_numsub(channel))[channel.encode()]


def test_hub_shares_one_subscription_and_delivers_to_every_listener(r, redis_url):
    hub = ChannelHub(redis.Redis.from_url(redis_url))
    channel = f"test:hub:{uuid.uuid4().hex}"
    a, b = hub.subscribe(channel), hub.subscribe(channel)
    assert numsub(r, channel) == 1
    r.publish(channel, "one")
    r.publish(channel, "two")
    got_a, got_b = [], []
    wait_until(lambda: got_a.extend(a.get_batch(0.2)) or len(got_a) == 2, what="a's messages")
    wait_until(lambda: got_b.extend(b.get_batch(0.2)) or len(got_b) == 2, what="b's messages")
    assert got_a == got_b == [b"one", b"two"]
    a.close()
    assert numsub(r, channel) == 1  # b still listens
    b.close()
    wait_until(lambda: numsub(r, channel) == 0, what="the unsubscribe")
    # Resubscribing the same channel right away is live before subscribe() returns.
    c = hub.subscribe(channel)
    r.publish(channel, "three")
    wait_until(lambda: c.get_batch(0.2) == [b"three"], what="c's message")
    c.close()


def test_a_broken_connection_fails_streams_and_the_hub_recovers(r, redis_url):
    name = f"hub-{uuid.uuid4().hex[:8]}"
    hub = ChannelHub(redis.Redis.from_url(redis_url, client_name=name))
    channel = f"test:hub:{uuid.uuid4().hex}"
    sub = hub.subscribe(channel)
    for c in r.client_list():
        if c["name"] == name:
            r.client_kill_filter(_id=c["id"])
    with pytest.raises(redis.ConnectionError):
        wait_until(lambda: sub.get_batch(0.2), what="the failure")
    again = wait_until(lambda: _try_subscribe(hub, channel), what="a new subscription")
    r.publish(channel, "after")
    wait_until(lambda: again.get_batch(0.2) == [b"after"], what="the message after recovery")
    again.close()


def test_a_connection_dropped_while_nothing_listens_does_not_fail_the_next_stream(r, redis_url):
    """With no subscriptions the reader leaves the socket alone, so a Redis restart in a
    quiet spell would otherwise only show when the next stream's SUBSCRIBE fails on it."""
    name = f"hub-{uuid.uuid4().hex[:8]}"
    hub = ChannelHub(redis.Redis.from_url(redis_url, client_name=name))
    channel = f"test:hub:{uuid.uuid4().hex}"
    hub.subscribe(channel).close()
    wait_until(lambda: numsub(r, channel) == 0, what="the unsubscribe")
    for c in r.client_list():
        if c["name"] == name:
            r.client_kill_filter(_id=c["id"])
    time.sleep(0.05)  # the FIN reaches the hub's socket (loopback: at once, but not before CLIENT KILL returns)
    sub = hub.subscribe(channel)  # well inside the reader's 1 s idle wait: it has not looked at the socket
    r.publish(channel, "first")
    assert sub.get_batch(2.0) == [b"first"]
    sub.close()


def two_listeners_one_keeping_up(r, redis_url, messages: int):
    """A hub of int messages, two listeners of one channel, and ``messages`` published
    one at a time with the first listener reading each as it comes."""
    hub = ChannelHub(redis.Redis.from_url(redis_url), decode=lambda b: int(b))
    channel = f"test:hub:{uuid.uuid4().hex}"
    keeping_up, other = hub.subscribe(channel), hub.subscribe(channel)
    got = []
    for i in range(messages):
        r.publish(channel, i)
        got.extend(keeping_up.get_batch(2.0))
    return hub, channel, keeping_up, other, got


def test_listeners_read_at_their_own_pace_and_what_all_have_read_is_dropped(r, redis_url):
    hub, channel, fast, slow, got_fast = two_listeners_one_keeping_up(r, redis_url, 300)
    got_slow = []
    wait_until(lambda: got_slow.extend(slow.get_batch(0.2)) or len(got_slow) >= 300, what="the slow listener")
    wait_until(lambda: got_fast.extend(fast.get_batch(0.2)) or len(got_fast) >= 300, what="the fast listener")
    assert got_fast == got_slow == list(range(300))
    for i in range(300, 300 + fanout.TRIM_EVERY):
        r.publish(channel, i)
        assert fast.get_batch(2.0) == slow.get_batch(2.0) == [i]
    # Everything both have read can go: the buffer holds less than a trim interval.
    base, frames = hub._channels[channel].window
    assert base > 0 and len(frames) < fanout.TRIM_EVERY
    fast.close()
    slow.close()


def test_a_listener_too_far_behind_is_failed_and_the_others_go_on(r, redis_url, monkeypatch):
    monkeypatch.setattr(fanout, "MAX_BACKLOG", 100)
    hub, channel, reader, stalled, got = two_listeners_one_keeping_up(r, redis_url, 300)
    wait_until(lambda: got.extend(reader.get_batch(0.2)) or len(got) >= 300, what="the reading listener")
    assert got == list(range(300))
    with pytest.raises(redis.ConnectionError, match="behind"):
        stalled.get_batch(0.2)
    # The stalled one no longer pins the buffer.
    assert len(hub._channels[channel].window[1]) <= fanout.MAX_BACKLOG
    reader.close()
    stalled.close()


def _try_subscribe(hub, channel):
    try:
        return hub.subscribe(channel, timeout=1.0)
    except redis.ConnectionError:
        return None


@pytest.mark.slow
def test_many_watchers_of_one_job_on_gunicorn_use_one_subscription(live_api, r, worker_factory, tiny_model):
    model = f"fan-{uuid.uuid4().hex[:6]}"
    worker = worker_factory(model, tiny_model)
    worker.proc.send_signal(signal.SIGSTOP)  # the job waits in the queue while watchers connect
    with requests.Session() as s:
        job = s.post(f"{live_api}/v1/jobs", json={"operation": "infer", "model": model, "prompt": "many eyes",
                                                   "max_tokens": 40, "temperature": 0}).json()["job_id"]
    n, seen, replayed = 20, [], threading.Semaphore(0)

    def watch():
        seqs = []
        with requests.get(f"{live_api}/v1/jobs/{job}/stream", stream=True, timeout=60) as resp:
            for frame in parse_sse(resp.iter_lines(chunk_size=None)):
                event = json.loads(frame["data"])
                seqs.append((event["seq"], event["type"]))
                if event["type"] == "queued":
                    replayed.release()
                if event["type"] in ("end", "error"):
                    break
        seen.append(seqs)

    threads = [threading.Thread(target=watch) for _ in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        assert replayed.acquire(timeout=30)
    # Every watcher is subscribed (the replay comes after the subscription), on one connection.
    assert numsub(r, keys.job_channel(job)) == 1
    worker.proc.send_signal(signal.SIGCONT)  # now the job runs
    for t in threads:
        t.join(60)
    assert len(seen) == n
    # Every watcher got every event, in order, no gaps, up to the end.
    assert [seq for seq, _ in seen[0]] == list(range(len(seen[0])))
    assert seen[0][-1][1] == "end" and sum(t == "token" for _, t in seen[0]) >= 1
    assert all(seqs == seen[0] for seqs in seen)
    wait_until(lambda: numsub(r, keys.job_channel(job)) == 0, what="the last watcher's unsubscribe")
