"""`inferq up`'s own redis-server: loopback only, protected mode, a random password nobody else sees."""
import stat

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from inferq.embedded_redis import EmbeddedRedis, masked


@pytest.fixture()
def server(tmp_path):
    s = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    yield s
    s.stop()


def test_it_wants_the_password_and_its_url_carries_it(server):
    once = Retry(NoBackoff(), 0)  # redis-py retries a refused AUTH with back-off by default
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port, retry=once).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port, password="guess", retry=once).ping()
    client = redis.Redis.from_url(server.url)
    assert client.ping()
    config = {**client.config_get("bind"), **client.config_get("protected-mode")}
    assert config == {"bind": "127.0.0.1", "protected-mode": "yes"}
    assert len(server.password) >= 32 and server.password in server.url


def test_the_password_is_not_on_the_command_line_nor_readable_by_others(server):
    cmdline = open(f"/proc/{server.process.pid}/cmdline", "rb").read()
    assert b"redis-server" in cmdline and server.password.encode() not in cmdline
    conf = server.data_dir / "redis.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert server.password not in (server.data_dir / "redis.log").read_text()


def test_a_restart_keeps_the_password_and_each_server_has_its_own(server, tmp_path):
    url = server.url
    server.stop()
    server.start()
    assert server.url == url and redis.Redis.from_url(url).ping()
    other = EmbeddedRedis(tmp_path / "other", appendonly=False)
    assert other.password != server.password


def test_masked_hides_only_the_password():
    assert masked("redis://:s3cr3t@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert masked("redis://user:s3cr3t@redis:6379/1") == "redis://user:***@redis:6379/1"
    assert masked("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
