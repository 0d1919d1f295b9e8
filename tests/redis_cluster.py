"""The tests' real Redis Cluster (inferq/local_cluster.py): ``from tests.redis_cluster import redis_cluster
# noqa: F401`` gives a module its ``redis_cluster`` fixture."""
from __future__ import annotations

import pytest

from inferq.local_cluster import REDIS_SERVER, RedisCluster, server_version


@pytest.fixture(scope="module")
def redis_cluster():
    version = server_version()
    if version is None or version < (7,):
        pytest.skip(f"a Redis Cluster needs {REDIS_SERVER} 7 or newer (Debian's redis-server package); "
                    f"found {'none' if version is None else '.'.join(map(str, version))}")
    with RedisCluster() as cluster:
        yield cluster
