"""A real Redis Cluster on loopback: 3 masters with a replica each, from Debian's redis-server 7.

For the tests (``tests/redis_cluster.py`` makes a fixture of it) and the benchmarks
(``bench.scaleout --events cluster``). Nodes are killed, never stopped cleanly, as a
lost machine would be: ``kill`` then ``wait_failover`` sees a replica take over.
"""
from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import redis

REDIS_SERVER, REDIS_CLI = "/usr/bin/redis-server", "/usr/bin/redis-cli"
# Short, so a failover takes a few seconds: a replica starts one once its master is unseen this long.
NODE_TIMEOUT_MS = 1000


@dataclass
class Node:
    port: int
    dir: str
    process: subprocess.Popen
    id: str = ""
    master_id: str | None = None  # the master it replicates, None for a master
    client: redis.Redis = field(init=False, repr=False)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class RedisCluster:
    def __init__(self, masters: int = 3):
        self.masters = masters
        self.password = secrets.token_urlsafe(16)
        self.root = tempfile.mkdtemp(prefix="inferq-cluster-")
        self.nodes: list[Node] = []

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])
        return f"redis+cluster://:{self.password}@{seeds}"

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> RedisCluster:
        try:
            for port in _free_ports(self.masters * 2):
                self.nodes.append(self._node(port))
            for node in self.nodes:
                _wait(lambda: _answers(node), timeout, f"node {node.port} to answer")
            subprocess.run([REDIS_CLI, "--no-auth-warning", "-a", self.password, "--cluster", "create",
                            *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-replicas", "1",
                            "--cluster-yes"], check=True, capture_output=True, timeout=timeout)
            for node in self.nodes:
                node.id = node.client.execute_command("CLUSTER MYID").decode()
            _wait(self._settled, timeout, "the cluster to be ok with every replica synced")
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self, port: int) -> Node:
        path = os.path.join(self.root, str(port))
        os.mkdir(path)
        # The password in a file, not on the command line, where `ps` shows it to every user.
        with open(os.path.join(path, "redis.conf"), "w") as f:
            f.write(f"requirepass {self.password}\nmasterauth {self.password}\n")
        # A replica's first sync without the default 5 s wait for more replicas to join it.
        process = subprocess.Popen(
            [REDIS_SERVER, os.path.join(path, "redis.conf"), "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--dir", path, "--save", "",
             "--appendonly", "no", "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--repl-diskless-sync-delay",
             "0", "--logfile", "redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        node = Node(port, path, process)
        node.client = redis.Redis(port=port, password=self.password, socket_timeout=2, socket_connect_timeout=1)
        return node

    def _settled(self) -> bool:
        live = [n for n in self.nodes if n.alive]
        for node in live:
            if node.client.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                return False
            role = node.client.info("replication")
            if role["role"] == "master":
                node.master_id = None
            elif role.get("master_link_status") != "up" or role.get("master_sync_in_progress"):
                return False
            else:
                node.master_id = next(n.id for n in live if n.port == role["master_port"])
        return True

    def master_for_key(self, key: str) -> Node:
        slot = self.live()[0].client.execute_command("CLUSTER KEYSLOT", key)
        for start, end, master, *_ in self.live()[0].client.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == master[1])
        raise AssertionError(f"no master serves slot {slot}")

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def kill(self, node: Node) -> None:
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()

    def wait_failover(self, old_master: Node, timeout: float = 30) -> Node:
        """Until a replica of ``old_master`` is master and the cluster is ok again; returns it."""
        replicas = [n for n in self.live() if n.master_id == old_master.id]
        if not replicas:
            raise AssertionError(f"node {old_master.port} has no live replica to take over")

        def promoted():
            # The new master's view comes first: the other nodes' cluster_state follows from it.
            return (any(n.client.info("replication")["role"] == "master" for n in replicas)
                    and self._settled())

        _wait(promoted, timeout, f"a replica of {old_master.port} to take over")
        return next(n for n in replicas if n.master_id is None)

    def stop(self) -> None:
        for node in self.nodes:
            node.client.close()
            if node.alive:
                node.process.kill()
            node.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _free_ports(count: int) -> list[int]:
    """Ports free now, each with its cluster bus port (+10000) free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 50000)
        if port not in ports and all(_free(p) for p in (port, port + 10000)):
            ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _answers(node: Node) -> bool:
    if not node.alive:
        raise AssertionError(f"redis-server on port {node.port} exited; see {node.dir}/redis.log")
    try:
        return node.client.ping()
    except redis.ConnectionError:
        return False


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError:  # a node mid-change (loading, failing over) answers errors for a moment
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def server_version() -> tuple[int, ...] | None:
    if not os.access(REDIS_SERVER, os.X_OK):
        return None
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"v=(\d+)\.(\d+)", out)
    return tuple(map(int, found.groups())) if found else None
