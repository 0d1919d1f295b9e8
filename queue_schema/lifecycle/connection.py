"""Redis clients from ``REDIS_URL``, and the URL as it may be shown.

Every process builds its clients here, so whatever ``REDIS_URL`` redis-py
reads (``redis://``, ``rediss://``, ``unix://``) works, and so does a
Sentinel URL::

    redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db][?sentinel_password=...]

A Sentinel client asks the sentinels where the master of ``service_name`` is
whenever it (re)connects, so after a failover it follows the promoted replica;
until one is promoted its commands fail with ``redis.ConnectionError``, which
callers already treat as "Redis is unavailable" (``queue_schema.lifecycle.redis_errors``).
The URL is parsed by ``redis_sentinel_url``, the parser rq-dashboard uses, so the
dashboard the API embeds reads the same URL the same way.

The job logs may live on another store (``INFERQ_EVENTS_URL``, see
``events_client``), which may also be a Redis Cluster::

    redis+cluster://[:password@]host:port[,host:port...][?option=...]   (rediss+cluster:// for TLS)

The hosts are seeds: the client learns every node and slot from them.
``REDIS_URL`` cannot be a cluster: RQ keeps a job's keys in one Redis and runs
multi-key commands across queues.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis_sentinel_url import parse_sentinel_url

from queue_schema.errors import ConfigError

SENTINEL_SCHEME = "redis+sentinel"
# A sentinel answers one small command per (re)connect. Its connections get their own
# timeouts: a data client may have none (a worker's BLPOP connection), and a sentinel
# that stopped answering must not hold a reconnect for ever.
SENTINEL_TIMEOUT_S = 2.0
_SECRETS = re.compile(r"(^|&)((?:sentinel_)?password)=[^&]*")
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
CLUSTER_FORM = "redis+cluster://[:password@]host:port[,host:port...]"


class RedisURLError(ConfigError):
    """``REDIS_URL`` cannot be used; the message says why in one line, without the password."""


def masked(url: str) -> str:
    """``url`` with its passwords (if any) replaced by ``***``, for logs and terminals."""
    parts = urlsplit(url)
    query = _SECRETS.sub(r"\1\2=***", parts.query)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def store_identity(url: str | None) -> str:
    """The text that names a store without its secrets, for processes to compare: ``""`` for none (the
    queue's own Redis), else ``url`` with its passwords left out. Two URLs that differ only in a password
    name one store; the seeds of a cluster are kept in their order, so list them alike everywhere."""
    if not url:
        return ""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = (f"{parts.username}@" if parts.username else "") + netloc.rpartition("@")[2]
    query = "&".join(p for p in parts.query.split("&") if p and not _SECRETS.match(p))
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme == SENTINEL_SCHEME


def is_cluster(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def parse_cluster(url: str) -> tuple[list[tuple[str, int]], dict]:
    """The seeds of a cluster URL, and the client options it gives (password, TLS, its query's)."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise RedisURLError(f"not a {CLUSTER_FORM} URL: {masked(url)}")
    # One reading for every process: a user name or a db that some of them ignored would split the fleet.
    if parts.username:
        raise RedisURLError(f"{parts.scheme}:// URLs take a password only (:password@host), not a user name: "
                            f"{masked(url)}")
    if parts.path not in ("", "/"):
        raise RedisURLError(f"a Redis Cluster has no db numbers: drop the path of {masked(url)}")
    seeds = []
    for seed in parts.netloc.rpartition("@")[2].split(","):
        try:
            address = urlsplit(f"//{seed}")
            host, port = address.hostname, address.port or 6379
        except ValueError:
            host = None
        if not host:
            raise RedisURLError(f"cannot read {masked(url)}: the seeds are host:port, as in {CLUSTER_FORM}")
        seeds.append((host, port))
    try:
        options = redis.connection.parse_url(f"redis://?{parts.query}")
    except ValueError as exc:
        raise RedisURLError(f"cannot read {masked(url)}: {exc}") from None
    if "db" in options:
        raise RedisURLError(f"a Redis Cluster has no db numbers: drop db= from {masked(url)}")
    if parts.password is not None:
        options["password"] = unquote(parts.password)
    options["ssl"] = CLUSTER_SCHEMES[parts.scheme]
    return seeds, options


def events_client(url: str, **options) -> redis.Redis | RedisCluster:
    """A client for the job logs' store: a ``RedisCluster`` for a cluster URL (it reads the cluster's
    layout from the seeds now, so an unreachable cluster fails here), else ``client(url)``. ``options``
    are redis-py connection options, the URL's own win; RedisCluster ignores those its nodes' connections
    do not take (``health_check_interval``)."""
    if not is_cluster(url):
        return client(url, **options)
    seeds, url_options = parse_cluster(url)
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds], **{**options, **url_options})


def _refuse_cluster(url: str) -> None:
    if is_cluster(url):
        raise RedisURLError(f"REDIS_URL cannot be a Redis Cluster ({masked(url)}): RQ needs one Redis; "
                            f"only INFERQ_EVENTS_URL, where the job logs live, can be a cluster")


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names."""

    hosts: list[tuple[str, int]]
    service: str
    client_options: dict  # for connections to the master: db, password, the caller's options
    sentinel_options: dict  # for connections to the sentinels


def parse_sentinel(url: str, **client_options) -> SentinelTarget:
    """Read a Sentinel URL as rq-dashboard does; options in the URL win over ``client_options``."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise RedisURLError(f"not a {SENTINEL_SCHEME}:// URL: {masked(url)}")
    # Both refusals keep inferq and rq-dashboard reading one URL one way: its parser drops
    # user names and does not percent-decode, where redis-py's from_url does both.
    if parts.username:
        raise RedisURLError(f"{SENTINEL_SCHEME}:// URLs take a password only (:password@host), "
                            f"not a user name: {masked(url)}")
    if "%" in (parts.password or ""):
        raise RedisURLError(f"{SENTINEL_SCHEME}:// passwords are read as written, without percent-decoding: "
                            f"use URL-safe characters: {masked(url)}")
    try:
        parsed = parse_sentinel_url(url, client_options=dict(client_options))
    except ValueError as exc:
        raise RedisURLError(f"cannot read {masked(url)}: {exc}") from None
    service = parsed.default_client.service
    if not service:
        raise RedisURLError(f"{masked(url)} names no service: {SENTINEL_SCHEME}://host:port/SERVICE[/db]")
    if parsed.default_client.type != "master":
        raise RedisURLError(f"{masked(url)} asks for a replica: inferq writes, so it needs the master")
    sentinel_options = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                        **parsed.sentinel_options}
    password = parse_qs(parts.query).get("sentinel_password")
    if password:
        sentinel_options["password"] = password[-1]
    return SentinelTarget(parsed.hosts, service, parsed.client_options, sentinel_options)


def sentinel_password(url: str) -> str | None:
    """The password a Sentinel URL gives for the sentinels themselves (``?sentinel_password=``)."""
    return parse_sentinel(url).sentinel_options.get("password") if is_sentinel(url) else None


def client(url: str, **options) -> redis.Redis:
    """A client for ``url``; ``options`` are redis-py connection options (the URL's own win)."""
    _refuse_cluster(url)
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel(url, **options)
    return _sentinels(target).master_for(target.service, **target.client_options)


def blocking_client(url: str, max_connections: int, timeout: float, **options) -> redis.Redis:
    """A client whose pool holds at most ``max_connections``: a caller past that waits up to
    ``timeout`` seconds for a free one, then gets ``redis.ConnectionError``."""
    _refuse_cluster(url)
    if not is_sentinel(url):
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout,
                                                     **options)
    else:
        target = parse_sentinel(url, **options)
        pool = BlockingSentinelPool(target.service, _sentinels(target), max_connections=max_connections,
                                    timeout=timeout, is_master=True, **target.client_options)
    return redis.Redis(connection_pool=pool)


def _sentinels(target: SentinelTarget) -> Sentinel:
    return _Sentinel(target.hosts, sentinel_kwargs=target.sentinel_options)


class _Sentinel(Sentinel):
    """redis-py's Sentinel, whose "no master" error fits on a line: its own holds the repr of
    every sentinel client, and the API logs it for each request while a failover runs."""

    def discover_master(self, service_name):
        try:
            return super().discover_master(service_name)
        except MasterNotFoundError as exc:
            hosts = ", ".join("{host}:{port}".format_map(s.connection_pool.connection_kwargs) for s in self.sentinels)
            raise MasterNotFoundError(f"no master for {service_name!r} from the sentinels at {hosts} (unreachable, "
                                      f"or none sees a master that is up)") from exc


class BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's master lookup with BlockingConnectionPool's bound.

    By the MRO, SentinelConnectionPool supplies the connection class (one that
    asks the sentinels for the master's address on connect, and turns a READONLY
    answer from a demoted master into a ConnectionError), ``owns_connection``
    (a connection to a former master is not taken back) and ``reset``;
    BlockingConnectionPool supplies ``get_connection``/``release``/``disconnect``
    over its bounded queue.
    """

    def release(self, connection) -> None:
        if not self.owns_connection(connection):
            # BlockingConnectionPool disconnects a connection it does not own and frees its
            # slot, but keeps it in the list of every connection it made: without this each
            # failover would leave up to max_connections dead ones there for good.
            try:
                self._connections.remove(connection)
            except ValueError:
                pass
        super().release(connection)
