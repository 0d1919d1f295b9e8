"""/metrics shows what an operator needs to see a limit coming: Redis CPU and commands (per token, with the
tokens counter), Redis memory against maxmemory, each tenant's batch quota use against its bounds, and how
long webhook deliveries wait. On a Redis of the test's own, so nothing else moves the figures."""
import redis

from api import create_app
from inferq.embedded_redis import EmbeddedRedis
from queue_schema import keys
from queue_schema.lifecycle import clock
from tests.test_operations_view import scrape, value

MAXMEMORY = 64 << 20


def test_metrics_show_redis_quotas_and_webhook_lag(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False, maxmemory=MAXMEMORY).start()
    try:
        r = redis.Redis.from_url(server.url)
        app = create_app({"REDIS_URL": server.url, "TESTING": True, "MAX_BATCHES_PER_TENANT": 3,
                          "BATCH_BYTES_PER_TENANT": 1000}).test_client()
        # Alice: one batch in flight holding 120 bytes of results, one that ended, an output file of 300 bytes.
        r.sadd(keys.BATCH_TENANTS, "alice")
        r.hset(keys.batch("batch_live"), mapping={"status": "in_progress", "result_bytes": 120})
        r.hset(keys.batch("batch_done"), mapping={"status": "completed", "result_bytes": 999})
        r.sadd(keys.tenant_open_batches("alice"), "batch_live", "batch_done", "batch_expired")
        r.hset(keys.file("file_out"), mapping={"purpose": "batch_output", "bytes": 300})
        r.hset(keys.file("file_in"), mapping={"purpose": "batch", "bytes": 5000})  # input: not held against it
        r.zadd(keys.tenant_files("alice"), {"file_out": 1, "file_in": 2})
        now = clock.now_ms(r)
        r.zadd(keys.WEBHOOKS_DUE, {"waiting": now - 5000, "retry-later": now + 60_000})

        first = scrape(app)
        assert value(first, "inferq_tenant_batch_quota_used", tenant="alice", quota="batches") == 1
        assert value(first, "inferq_tenant_batch_quota_used", tenant="alice", quota="bytes") == 420
        assert value(first, "inferq_tenant_batch_quota_limit", quota="batches") == 3
        assert value(first, "inferq_tenant_batch_quota_limit", quota="bytes") == 1000
        assert r.smembers(keys.tenant_open_batches("alice")) == {b"batch_live"}  # the ended ones are dropped
        assert 4.5 <= value(first, "inferq_webhook_delivery_lag_seconds") < 60
        assert value(first, "inferq_webhook_deliveries_pending") == 2
        assert value(first, "inferq_redis_maxmemory_bytes") == MAXMEMORY
        assert 0 < value(first, "inferq_redis_used_memory_bytes") < MAXMEMORY
        assert value(first, "inferq_redis_cpu_seconds_total") > 0

        for i in range(200):
            r.set(f"load:{i}", i)
        second = scrape(app)
        assert value(second, "inferq_redis_commands_total") - value(first, "inferq_redis_commands_total") >= 200
        assert value(second, "inferq_redis_cpu_seconds_total") >= value(first, "inferq_redis_cpu_seconds_total")
        r.zrem(keys.WEBHOOKS_DUE, "waiting")
        assert value(scrape(app), "inferq_webhook_delivery_lag_seconds") == 0  # only a retry not yet due
    finally:
        server.stop()
