"""INFERQ_EVENTS_URL: cluster URLs, the events client on a real Redis Cluster, and the fleet's one store."""
from __future__ import annotations

import re
import time

import pytest
import redis
from redis.cluster import RedisCluster

from inferq.embedded_redis import EmbeddedRedis
from queue_schema import keys
from queue_schema.errors import ConfigError
from queue_schema.lifecycle import connection, events_url
from queue_schema.lifecycle.connection import RedisURLError
from queue_schema.lifecycle.events_url import USER_TTL_MS, EventsStoreMismatch
from tests.conftest import wait_until
from tests.redis_cluster import redis_cluster  # noqa: F401

SECRET = "s3cret-pw"
CLUSTER = "redis+cluster://c1.example:7000,c2.example:7001"


def test_cluster_urls_name_their_seeds_password_and_tls():
    assert connection.parse_cluster(f"redis+cluster://:{SECRET}@a:7000,[::1]:7001,b?socket_timeout=2") == (
        [("a", 7000), ("::1", 7001), ("b", 6379)], {"password": SECRET, "socket_timeout": 2.0, "ssl": False})
    assert connection.parse_cluster("rediss+cluster://a:7000/?ssl_cert_reqs=none") == (
        [("a", 7000)], {"ssl": True, "ssl_cert_reqs": "none"})
    assert connection.is_cluster(CLUSTER) and connection.is_cluster("rediss+cluster://a:1")
    assert not connection.is_cluster("redis://a:1") and not connection.is_cluster("redis+sentinel://a:1/m")
    assert connection.masked(f"redis+cluster://:{SECRET}@a:1,b:2?password={SECRET}") == \
        "redis+cluster://:***@a:1,b:2?password=***"


@pytest.mark.parametrize("url, why", [
    (f"redis+cluster://:{SECRET}@a:7000/0", "no db numbers"),
    (f"redis+cluster://:{SECRET}@a:7000?db=1", "no db numbers"),
    (f"redis+cluster://admin:{SECRET}@a:7000", "not a user name"),
    (f"redis+cluster://:{SECRET}@", "seeds are host:port"),
    (f"redis+cluster://:{SECRET}@a:7000,,b:7001", "seeds are host:port"),
    (f"rediss+cluster://:{SECRET}@a:port", "seeds are host:port"),
    (f"redis+cluster://:{SECRET}@a:7000?socket_timeout=soon", "socket_timeout"),
])
def test_refused_cluster_urls_say_why_without_the_password(url, why):
    with pytest.raises(RedisURLError, match=why) as caught:
        connection.events_client(url)
    assert SECRET not in str(caught.value) and "\n" not in str(caught.value)


def test_redis_url_cannot_be_a_cluster():
    for make in (connection.client, lambda url: connection.blocking_client(url, 4, 1.0)):
        with pytest.raises(RedisURLError, match="REDIS_URL cannot be a Redis Cluster.*INFERQ_EVENTS_URL") as caught:
            make(f"redis+cluster://:{SECRET}@a:7000")
        assert SECRET not in str(caught.value)


def test_store_identity_leaves_secrets_out_and_keeps_the_rest():
    assert connection.store_identity(None) == connection.store_identity("") == ""
    assert connection.store_identity(f"redis+cluster://:{SECRET}@b:2,a:1?password={SECRET}&socket_timeout=2") == \
        "redis+cluster://b:2,a:1?socket_timeout=2"
    assert connection.store_identity(f"redis://user:{SECRET}@h:6379/3") == "redis://user@h:6379/3"
    assert connection.store_identity(f"redis+sentinel://:{SECRET}@s1:26379,s2:26379/ev?sentinel_password={SECRET}") \
        == "redis+sentinel://s1:26379,s2:26379/ev"


def test_from_env():
    assert events_url.from_env({}) is None and events_url.from_env({"INFERQ_EVENTS_URL": "  "}) is None
    assert events_url.from_env({"INFERQ_EVENTS_URL": f" {CLUSTER} "}) == CLUSTER


def test_events_client_of_a_plain_url_is_a_plain_client(redis_url):
    events = connection.events_client(redis_url, socket_timeout=2)
    assert type(events) is redis.Redis and events.ping()


def test_events_client_spans_the_cluster(redis_cluster):  # noqa: F811
    events = connection.events_client(redis_cluster.url, socket_timeout=2, health_check_interval=10)
    assert isinstance(events, RedisCluster)
    names = [f"inferq:job:{i}:events" for i in range(40)]
    assert len({redis_cluster.master_for_key(k).port for k in names}) == 3  # every master holds some
    for name in names:
        events.xadd(name, {"seq": name})
    assert [events.xrange(k)[0][1] for k in names] == [{b"seq": k.encode()} for k in names]


def test_sharded_pubsub_on_the_cluster(redis_cluster):  # noqa: F811
    events = connection.events_client(redis_cluster.url, socket_timeout=2)
    channel = "inferq:job:{j1}:live"
    pubsub = events.pubsub()
    pubsub.ssubscribe(channel)
    wait_until(lambda: pubsub.get_sharded_message(timeout=0.1), what="the ssubscribe confirmation")
    assert events.spublish(channel, "hello") == 1
    message = wait_until(lambda: pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=0.1),
                         what="the sharded message")
    assert (message["type"], message["channel"], message["data"]) == ("smessage", channel.encode(), b"hello")
    pubsub.close()


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    """A Redis of this module's own: the fleet's store and the open jobs are fixed keys."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("events-redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture()
def q(own_redis):
    client = redis.Redis.from_url(own_redis.url)
    client.flushall()
    yield client
    client.close()


A, B = "", "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"
T = 1_000_000


def refusal(q, identity, process, now_ms) -> str:
    with pytest.raises(EventsStoreMismatch) as caught:
        events_url.claim(q, identity, process, now_ms)
    assert isinstance(caught.value, ConfigError) and "\n" not in str(caught.value)
    return str(caught.value)


def test_the_first_claim_sets_the_store_and_the_same_store_joins(q):
    events_url.claim(q, B, "api-1", T)
    events_url.claim(q, B, "worker-1", T + 1)
    assert q.get(keys.EVENTS_STORE) == B.encode()
    assert q.zrange(keys.EVENTS_USERS, 0, -1, withscores=True) == [(f"{B}\tapi-1".encode(), T),
                                                                    (f"{B}\tworker-1".encode(), T + 1)]


def test_another_store_is_refused_while_a_user_of_the_fleets_is_seen(q):
    events_url.claim(q, A, "api-1", T)
    message = refusal(q, B, "worker-2", T + USER_TTL_MS - 1)
    assert message == (f"this process keeps job logs on {B}, but the fleet keeps them on the queue's own Redis "
                       f"and a process using the queue's own Redis is running (api-1): give every process the "
                       f"same INFERQ_EVENTS_URL, or stop them all and let the open jobs drain "
                       f"(docs/DESIGN.md, Scale-out)")
    assert q.get(keys.EVENTS_STORE) == b"" and q.zcard(keys.EVENTS_USERS) == 1


def test_another_store_is_refused_while_jobs_are_open(q):
    events_url.claim(q, A, "api-1", T)
    events_url.leave(q, A, "api-1")
    assert q.zcard(keys.EVENTS_USERS) == 0
    q.zadd(keys.OPEN_JOBS, {"j1": T, "j2": T})
    assert "2 open jobs have their logs there" in refusal(q, B, "worker-2", T + 1)
    # Before any claim the logs were on the queue's own Redis, and so are those of its open jobs.
    q.delete(keys.EVENTS_STORE)
    assert "the fleet keeps them on the queue's own Redis and 2 open jobs" in refusal(q, B, "worker-2", T + 1)
    q.zrem(keys.OPEN_JOBS, "j2")
    assert "1 open job has its logs there" in refusal(q, B, "worker-2", T + 1)


def test_a_drained_fleet_switches_and_its_late_process_is_told(q):
    events_url.claim(q, A, "api-1", T)
    events_url.claim(q, A, "worker-1", T)
    later = T + USER_TTL_MS + 1  # both unseen for longer than USER_TTL_MS: gone, without a leave
    events_url.claim(q, B, "worker-2", later)
    assert q.get(keys.EVENTS_STORE) == B.encode()
    assert q.zrange(keys.EVENTS_USERS, 0, -1) == [f"{B}\tworker-2".encode()]
    events_url.renew(q, B, "worker-2", later + 5000)
    with pytest.raises(EventsStoreMismatch, match=re.escape(f"moved them to {B} while it went unseen")) as caught:
        events_url.renew(q, A, "api-1", later + 5000)
    assert "\n" not in str(caught.value)
    events_url.leave(q, A, "api-1")  # as it shuts down
    events_url.claim(q, B, "worker-3", later + 5000)
    assert q.zcard(keys.EVENTS_USERS) == 2


def test_renew_claims_again_after_the_queue_redis_lost_its_data(q):
    events_url.claim(q, B, "worker-1", T)
    q.flushall()
    events_url.renew(q, B, "worker-1", T + 1)
    assert q.get(keys.EVENTS_STORE) == B.encode() and q.zscore(keys.EVENTS_USERS, f"{B}\tworker-1") == T + 1


def test_a_killed_master_fails_over_under_the_events_client(redis_cluster):  # noqa: F811 - last: it loses a node
    events = connection.events_client(redis_cluster.url, socket_timeout=2, socket_connect_timeout=1)
    name = keys.job_events("failover")
    events.xadd(name, {"seq": "1"})
    master = redis_cluster.master_for_key(name)
    assert master.client.execute_command("WAIT", 1, 5000) == 1  # the entry is on its replica
    started = time.monotonic()
    redis_cluster.kill(master)
    promoted = redis_cluster.wait_failover(master)
    assert redis_cluster.master_for_key(name) is promoted and time.monotonic() - started < 15
    wait_until(lambda: _read(events, name), what="the log through the promoted replica")
    assert _read(events, name) == [{b"seq": b"1"}]


def _read(events, name):
    try:
        return [fields for _, fields in events.xrange(name)]
    except (redis.ConnectionError, redis.TimeoutError):
        return None
