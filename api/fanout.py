"""One Redis pub/sub connection per API process, shared by every stream that process serves.

With a connection per stream, Redis writes each event once per watcher and the
API parses it once per watcher: at 1,000 watchers of one job that is 1,000
socket reads per token. Here one reader thread (a greenlet under gevent) reads
each message once and hands it to the queues of the local watchers of its
channel.

Each channel keeps the messages its local listeners have not all read in one
shared buffer; a message is one append and one wake-up of every waiting
listener, and each listener takes everything past its own cursor in one
slice. (A queue per listener cost a put per listener per message: 6.3 ms of
hand-off per message at 1,000 listeners, against 3.9 ms this way.)

A subscription is ready only once Redis has confirmed the SUBSCRIBE that
covers it, so callers can subscribe, then replay the event log, and know that
anything published after the replay reaches them. If the connection breaks,
every subscription is failed (``redis.ConnectionError`` from ``get``): the
stream ends and its client resumes with Last-Event-ID, from the log.

On an events cluster (INFERQ_EVENTS_URL) a job's channel is a shard channel
(SSUBSCRIBE: a classic PUBLISH would go to every node), and ``ShardedHubs``
keeps one such connection per master, each hub for the channels whose slots
that master serves. A master that fails over breaks its hub's connection, and
its streams resume from the log, which the cluster client finds on the
promoted replica.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
from redis.cluster import RedisCluster

log = logging.getLogger(__name__)
IDLE_S = 5.0
TRIM_EVERY = 64  # messages between drops of what every listener has read
MAX_BACKLOG = 20_000  # a listener further behind than this is failed, not buffered for


class _Channel:
    """A channel's unread messages, shared by its local listeners."""

    def __init__(self):
        # (index of frames[0] since the channel opened, frames): replaced as a whole
        # when trimmed, so a listener reading it from another thread sees one or the other.
        self.window: tuple[int, list] = (0, [])
        self.listeners: set[Subscription] = set()
        self.wake = threading.Event()
        self.broken = False
        self._since_trim = 0

    def end(self) -> int:
        base, frames = self.window
        return base + len(frames)

    def publish(self, payload) -> None:
        self.window[1].append(payload)
        self._since_trim += 1
        if self._since_trim >= TRIM_EVERY:
            self._trim()
        self._wake_all()

    def fail(self) -> None:
        self.broken = True
        self._wake_all()

    def _wake_all(self) -> None:
        wake, self.wake = self.wake, threading.Event()
        wake.set()

    def _trim(self) -> None:
        self._since_trim = 0
        base, frames = self.window
        end = base + len(frames)
        for sub in self.listeners:
            if end - sub.cursor > MAX_BACKLOG:
                sub.overrun = True  # its stream ends; the client resumes from the log
        keep = min((sub.cursor for sub in self.listeners if not sub.overrun), default=end)
        if keep > base:
            self.window = (keep, frames[keep - base:])


class Subscription:
    def __init__(self, hub: "ChannelHub", channel: str, shared: _Channel):
        self.hub = hub
        self.channel = channel
        self.ready = threading.Event()
        self.cursor = shared.end()  # messages from here on are this listener's
        self.overrun = False
        self._shared = shared

    def get_batch(self, timeout: float, limit: int = 256) -> list:
        """The messages waiting (at least one), or [] after ``timeout`` seconds of nothing."""
        shared = self._shared
        while True:
            wake = shared.wake  # taken before looking: a message after the look still wakes us
            if shared.broken:
                raise redis.ConnectionError("the API's pub/sub connection to Redis broke")
            if self.overrun:
                raise redis.ConnectionError(f"this stream fell more than {MAX_BACKLOG} messages behind")
            base, frames = shared.window
            if self.cursor < base + len(frames):
                start = self.cursor - base
                batch = frames[start:start + limit]
                self.cursor += len(batch)
                return batch
            if not wake.wait(timeout):
                return []

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# The pub/sub message types by kind, for classic and for sharded channels.
_KINDS = {"message": "message", "subscribe": "subscribe", "unsubscribe": "unsubscribe",
          "smessage": "message", "ssubscribe": "subscribe", "sunsubscribe": "unsubscribe"}


class ChannelHub:
    def __init__(self, client: redis.Redis, decode: Callable[[bytes], object] = bytes, sharded: bool = False):
        """``sharded``: the channels are shard channels (SSUBSCRIBE), all served by ``client``'s node."""
        self._client = client
        self._sharded = sharded
        self._decode = decode  # once per message, however many listeners share it
        self._lock = threading.Lock()
        self._channels: dict[str, _Channel] = {}
        # SUBSCRIBEs sent and confirmed per channel: a channel is live for its
        # listeners when every SUBSCRIBE sent for it has been confirmed.
        self._sent: dict[str, int] = {}
        self._confirmed: dict[str, int] = {}
        self._pubsub = None
        self._reader: threading.Thread | None = None
        self._idle_since = time.monotonic()

    def subscribe(self, channel: str, timeout: float = 5.0) -> Subscription:
        """A live subscription to ``channel``; ConnectionError if Redis doesn't confirm it in time."""
        with self._lock:
            self._start()
            if not self._channels:
                self._replace_if_dropped()
            shared = self._channels.setdefault(channel, _Channel())
            sub = Subscription(self, channel, shared)
            listeners = shared.listeners
            listeners.add(sub)
            if len(listeners) == 1:
                self._sent[channel] = self._sent.get(channel, 0) + 1
                try:
                    (self._pubsub.ssubscribe if self._sharded else self._pubsub.subscribe)(channel)
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    self._drop(sub)
                    raise
            elif self._confirmed.get(channel, 0) == self._sent.get(channel, 0):
                sub.ready.set()
        if not sub.ready.wait(timeout):
            sub.close()
            raise redis.ConnectionError(f"Redis did not confirm the subscription to {channel} in {timeout} s")
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if self._drop(sub) and self._pubsub is not None:
                try:
                    (self._pubsub.sunsubscribe if self._sharded else self._pubsub.unsubscribe)(sub.channel)
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    pass  # the reader sees the broken connection and resets

    def listener_count(self) -> int:
        with self._lock:
            return sum(len(c.listeners) for c in self._channels.values())

    def _drop(self, sub: Subscription) -> bool:
        """Forget ``sub``; True if it was its channel's last listener."""
        shared = self._channels.get(sub.channel)
        if shared is None or sub not in shared.listeners:
            return False
        shared.listeners.discard(sub)
        if shared.listeners:
            return False
        del self._channels[sub.channel]
        return True

    def _start(self) -> None:
        if self._reader is not None and self._reader.is_alive():
            return
        self._pubsub = self._client.pubsub()
        self._reader = threading.Thread(target=self._read, name="inferq-pubsub", daemon=True)
        self._reader.start()

    def _replace_if_dropped(self) -> None:
        # With nothing subscribed the reader leaves the socket alone, so a Redis
        # restart in a quiet spell would only show when this SUBSCRIBE failed on
        # the dead connection, failing the stream it was for.
        pubsub = self._pubsub
        if pubsub.connection is None or pubsub.subscribed:
            return  # not connected yet, or the reader is reading it
        try:
            dropped = pubsub.connection.can_read(timeout=0)  # unsubscribed: only EOF can be waiting
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            dropped = True
        if dropped:
            log.info("pub/sub connection was dropped while idle; opening a new one")
            self._fresh_connection()

    def _fresh_connection(self) -> None:
        """Forget every SUBSCRIBE in flight and give the next ones a new connection (lock held)."""
        self._sent.clear()
        self._confirmed.clear()
        old, self._pubsub = self._pubsub, self._client.pubsub()
        try:
            old.close()
        except Exception:  # already broken; nothing to tidy
            pass

    def _read(self) -> None:
        while True:
            try:
                # While nothing is subscribed this waits for the first SUBSCRIBE to be sent.
                m = self._pubsub.get_message(timeout=1.0)
                if m is None:
                    if self._stop_if_idle():
                        return
                    continue
            except (redis.ConnectionError, redis.TimeoutError, OSError, redis.ResponseError) as exc:
                # A ResponseError: a shard channel's slot moved to another node (MOVED) after a failover.
                log.warning("pub/sub connection lost (%s); failing %d streams", exc, self.listener_count())
                self._reset()
                time.sleep(0.2)
                continue
            channel = m["channel"].decode() if isinstance(m["channel"], bytes) else m["channel"]
            kind = _KINDS.get(m["type"])
            with self._lock:
                shared = self._channels.get(channel)
                if kind == "subscribe":
                    self._confirmed[channel] = self._confirmed.get(channel, 0) + 1
                    if shared is not None and self._confirmed[channel] == self._sent.get(channel, 0):
                        for sub in shared.listeners:
                            sub.ready.set()
                elif kind == "unsubscribe" and shared is None and \
                        self._confirmed.get(channel) == self._sent.get(channel):
                    del self._confirmed[channel], self._sent[channel]  # nothing in flight: forget it
            if kind == "message" and shared is not None:
                try:
                    payload = self._decode(m["data"])
                except Exception:  # one malformed message must not stop every stream
                    log.exception("dropped an undecodable message on %s", channel)
                    continue
                with self._lock:  # trimming reads the listeners, which subscribe() changes
                    shared.publish(payload)

    def _stop_if_idle(self) -> bool:
        """Give the connection back after IDLE_S with no listeners; the next subscribe starts over."""
        with self._lock:
            if self._channels:
                self._idle_since = time.monotonic()
                return False
            if time.monotonic() - self._idle_since < IDLE_S:
                return False
            self._pubsub.close()
            self._pubsub, self._reader = None, None
            self._sent.clear()
            self._confirmed.clear()
            return True

    def _reset(self) -> None:
        """Fail every subscription and start over on a fresh connection."""
        with self._lock:
            for shared in self._channels.values():
                shared.fail()
                for sub in shared.listeners:
                    sub.ready.set()  # a waiter wakes, then finds the connection broken in get_batch
            self._channels.clear()
            self._fresh_connection()


class ShardedHubs:
    """The job channels of an events cluster: a ChannelHub per master node, each for the shard channels whose
    slots that node serves."""

    def __init__(self, cluster: RedisCluster, decode: Callable[[bytes], object] = bytes):
        self._cluster = cluster
        self._decode = decode
        self._lock = threading.Lock()
        self._hubs: dict[str, ChannelHub] = {}

    def subscribe(self, channel: str, timeout: float = 5.0) -> Subscription:
        node = self._cluster.get_node_from_key(channel)
        with self._lock:
            hub = self._hubs.get(node.name)
            if hub is None:
                hub = self._hubs[node.name] = ChannelHub(self._cluster.get_redis_connection(node), self._decode,
                                                         sharded=True)
        try:
            return hub.subscribe(channel, timeout)
        except redis.ConnectionError:
            # The node may be gone (a failover): the next subscribe asks the cluster where the slot is now.
            self._cluster.nodes_manager.initialize()
            raise

    def listener_count(self) -> int:
        with self._lock:
            hubs = list(self._hubs.values())
        return sum(hub.listener_count() for hub in hubs)
