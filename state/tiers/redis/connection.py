"""The connection every piece of the Redis tier shares: one client (a server or a Redis Cluster),
the key names of one prefix, the Lua scripts, and Redis's errors mapped to runctx's."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.exceptions import ClusterDownError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from state.codec import DEFAULT_CODEC, Codec
from state.errors import CommunicationFailure, ContextCorruption
from state.keys import RedisKeys
from state.sentinel import SentinelURL, is_sentinel
from state.tiers.data import OutboxRoute
from state.models import StateCacheConfig
from state.tiers.scripts import SCRIPTS, lua

T = TypeVar("T")


class RedisConnection:
    """The client and names one Redis tier works with. Owns the client; promises that every Redis
    error leaves as a runctx error (CommunicationFailure, or ContextCorruption for a key that holds
    another type of value) and that a script is loaded again after the server forgot it."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        prefix: str,
        config: StateCacheConfig,
        codec: Codec = DEFAULT_CODEC,
        broadcast_commits: bool = True,
    ) -> None:
        self.client = client
        # On a cluster a script may only touch keys of one slot: a step's records then go separately.
        self.cluster = isinstance(client, RedisCluster)
        self.keys = RedisKeys(prefix)
        self.prefix = prefix
        self.config = config
        self.codec = codec
        # Commits and announcements go to the control bus, so other processes drop older L1 copies.
        self.bus_channel = self.keys.control_channel if broadcast_commits else ""
        self._scripts = {name: client.register_script(lua(name)) for name in SCRIPTS}
        self._committing = threading.local()  # each thread's connection for the commit script
        _CONNECTIONS.add(self)  # a forked child must not use its parent's (see _forget_connections)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Any:
        return cls(connect(url), **kwargs)

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except (RedisConnectionError, RedisTimeoutError, ClusterDownError) as exc:
            raise CommunicationFailure("L2 (Redis)", exc) from exc

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return self._call(lambda: self._scripts[name](keys=keys, args=args))
        except ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            # Something overwrote one of our keys with another type: drop the context entry (L3
            # holds the authoritative copy) and let the caller treat it as lost.
            self._call(lambda: self.client.delete(keys[0]))
            raise ContextCorruption(keys[0], "the key holds another type of value") from None

    def _commit_script(self, keys: list[str], args: list[Any]) -> Any:
        """The commit script, every step's one round trip, by the shortest way redis-py has: a
        connection of the pool that each thread keeps for it, without the per-command retry and
        metrics hooks. A connection that fails is dropped and the script sent once more on a new
        one (a commit cannot apply twice: its step id is in it); on a cluster, the client's own way."""
        if self.cluster:
            return self._script("commit", keys, args)
        script = self._scripts["commit"]
        conn = getattr(self._committing, "connection", None)
        if conn is None:  # kept checked out: the pool still closes it with the others
            conn = self._committing.connection = self.client.connection_pool.get_connection()
        for attempt in range(3):
            try:
                if attempt:  # connect() itself: behind Sentinel, it asks where the master is now
                    conn.connect()
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return conn.read_response()
            except NoScriptError:  # the server's script cache was flushed (a restart): load it again
                script.sha = self._call(lambda: self.client.script_load(script.script))
            except (RedisConnectionError, RedisTimeoutError) as exc:
                conn.disconnect()
                if attempt:
                    raise CommunicationFailure("L2 (Redis)", exc) from exc
            except ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                self._call(lambda: self.client.delete(keys[0]))  # as `_script` does
                raise ContextCorruption(keys[0], "the key holds another type of value") from None
        raise CommunicationFailure("L2 (Redis)", RuntimeError("the commit script could not be loaded"))

    def outbox_route(self, client: redis.Redis) -> OutboxRoute | None:
        """Where a commit's outbox can push onto queues ``client`` (e.g. the broker's) reads: None if
        it talks to another server (or L2 is a cluster), else L2's database or the other one it uses
        (a commit's script selects it to push). Asked of the servers (a key written here is read
        there in the same database, or both name the same server process), not guessed from URLs."""
        if self.cluster:
            return None
        key = self.keys.server_token(os.urandom(8).hex())
        try:
            self.client.set(key, "1", ex=30)
            same = bool(client.get(key))
            self.client.delete(key)
            if same:
                return OutboxRoute()
            if client.info("server").get("run_id") != self.client.info("server").get("run_id"):
                return None
        except redis.RedisError:
            return None
        return OutboxRoute(int(client.connection_pool.connection_kwargs.get("db") or 0))

    @property
    def database(self) -> int:
        """The database number of L2 on its server."""
        return int(self.client.connection_pool.connection_kwargs.get("db") or 0)

    def ping(self) -> bool:
        return bool(self._call(self.client.ping))

    def close(self) -> None:
        self.client.close()


_CONNECTIONS: weakref.WeakSet[RedisConnection] = weakref.WeakSet()


def _forget_connections() -> None:
    """In a forked child: the connections kept for the commit script are the parent's sockets; the
    child's first commit opens its own (redis-py's pool does the same for its own)."""
    for connection in list(_CONNECTIONS):
        connection._committing = threading.local()


os.register_at_fork(after_in_child=_forget_connections)


def connect(url: str, *, socket_timeout: float = 10) -> redis.Redis | RedisCluster:
    """A client for the Redis at ``url``; a cluster client when that server is a node of a cluster;
    for a ``sentinel://`` URL, a client of the master its Sentinels name, following it (`state.sentinel`)."""
    # Named connections: CLIENT LIST shows which process holds which (runctx-<pid>).
    options: dict[str, Any] = {"socket_timeout": socket_timeout, "client_name": f"runctx-{os.getpid()}"}
    if is_sentinel(url):
        return SentinelURL.parse(url).master_client(health_check_interval=30, **options)
    client = redis.Redis.from_url(url, health_check_interval=30, **options)
    try:
        enabled = client.info("cluster").get("cluster_enabled")
    except (RedisConnectionError, RedisTimeoutError, ResponseError):
        return client  # not reachable now: a plain server is the likelier; calls will say if it is down
    if not enabled:
        return client
    client.close()
    return RedisCluster.from_url(url, **options)


def is_cluster(url: str) -> bool:
    """Whether the Redis at ``url`` is a node of a Redis Cluster (False if it cannot be reached)."""
    client = connect(url)
    try:
        return isinstance(client, RedisCluster)
    finally:
        client.close()


def as_count(raw: bytes | None, default: int = 1) -> int:
    """A counter as Redis returns it (garbage counts as ``default``)."""
    try:
        return default if raw is None else int(raw)
    except ValueError:
        return default
