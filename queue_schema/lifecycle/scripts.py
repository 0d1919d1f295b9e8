"""Every Lua script inferq runs, loaded from ``lua/`` and called with named keys and arguments.

A script is a file ``lua/<name>.lua`` whose header says what it takes::

    -- KEYS: lease leases queue
    -- ARGV: owner job
    -- USES: log

``KEYS`` and ``ARGV`` name the script's fixed keys and arguments, in order; a
script that also takes a list (one group per job, say) reads it after them,
from ``KEYS[K_REST]`` and ``ARGV[A_REST]`` on. The loader puts a prologue in
front of the body, ``local K = {lease = KEYS[1], ...}`` and ``local A = {...}``,
so the body reads ``K.lease`` and ``A.owner``, never a bare position; the call
passes ``keys={...}`` and ``args={...}`` by name, and a missing or unknown name
fails at the call, in Python, with the script's name. ``USES`` names libraries in
``lua/lib/`` whose code goes in front too: ``log`` holds the event log's
conventions (entry ids, the closed mark, the fence, the live message), so every script that
reads or writes a log goes through the same few functions; ``keys`` is made here
from ``queue_schema/keys.py`` (``KEY.job_lease(id)``...), so a script that reaches
a job's keys from its id spells no name either.

Scripts are sent once per process and Redis (redis-py's ``Script``: EVALSHA,
then EVAL if Redis lost them in a restart or failover), and work in pipelines.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from redis.commands.core import Script as RedisScript

from queue_schema import keys

LUA = Path(__file__).with_name("lua")
_HEADER = re.compile(r"^--\s*(KEYS|ARGV|USES):(.*)$", re.M)


@dataclass(frozen=True)
class Script:
    name: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    source: str

    def __call__(self, client, keys: dict | None = None, args: dict | None = None, more_keys: Sequence = (),
                 more_args: Sequence = ()):
        """Run it on ``client`` (a client or a pipeline): ``keys`` and ``args`` by the names its header
        gives, then the lists it reads after them."""
        return _registered(client, self)(keys=[*self._order("KEYS", self.keys, keys), *more_keys],
                                         args=[*self._order("ARGV", self.args, args), *more_args],
                                         client=client)

    def _order(self, what: str, names: tuple[str, ...], given: dict | None) -> list:
        given = given or {}
        if set(given) != set(names):
            missing, unknown = sorted(set(names) - set(given)), sorted(set(given) - set(names))
            raise TypeError(f"script {self.name}: {what} missing {missing}, unknown {unknown}")
        return [given[n] for n in names]


@lru_cache(maxsize=None)
def load(name: str) -> Script:
    text = (LUA / f"{name}.lua").read_text()
    header: dict[str, list[str]] = {"KEYS": [], "ARGV": [], "USES": []}
    for kind, rest in _HEADER.findall(text):
        header[kind] += rest.split()
    libs = "".join(_keys_library() if lib == "keys" else (LUA / "lib" / f"{lib}.lua").read_text()
                   for lib in header["USES"])
    keys, args = tuple(header["KEYS"]), tuple(header["ARGV"])
    prologue = (f"local K = {{{', '.join(f'{k} = KEYS[{i}]' for i, k in enumerate(keys, 1))}}}\n"
                f"local A = {{{', '.join(f'{a} = ARGV[{i}]' for i, a in enumerate(args, 1))}}}\n"
                f"local K_REST, A_REST = {len(keys) + 1}, {len(args) + 1}\n")
    return Script(name, keys, args, prologue + libs + text)


# The key builders a script may need from an id (a job's, a limit key's, a queue name).
_KEY_BUILDERS = ("job_events", "job_channel", "job_cancel", "job_info", "job_lease", "rq_queue", "rq_job", "job_settled",
                 "limit_queued", "limit_running", "limit_bucket", "webhook", "batch", "batch_ended", "file")


def _keys_library() -> str:
    lines = ["local KEY = {}"]
    for name in _KEY_BUILDERS:
        before, after = keys.split(getattr(keys, name))
        lines.append(f"KEY.{name} = function(id) return {_lua(before)} .. id .. {_lua(after)} end")
    return "\n".join(lines) + "\n"


def _lua(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _registered(client, script: Script) -> RedisScript:
    return _redis_script(script.name)


@lru_cache(maxsize=None)
def _redis_script(name: str) -> RedisScript:
    # The source as bytes: redis-py then needs no client to hash it, and one object serves every client,
    # pipeline and cluster node (it sends the source again on NOSCRIPT, after a restart or a failover).
    return RedisScript(None, load(name).source.encode())
