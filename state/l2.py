"""L2: Redis, shared by every worker. Versioned, checksummed entries; compare-and-set writes.

Layout under the key prefix ``p``:
- ``p:ctx:<context_id>``  hash {v: version, c: checksum, d: payload}. No TTL while it holds a
  change not yet written to L3 ("dirty"), the context TTL once it is clean.
- ``p:cfg:<key>``         hash {v, c, d} for routine definitions and configurations, with a TTL.
- ``p:wb:due``            sorted set: dirty context ids scored by when their L3 write is due.
- ``p:wb:first``          hash: context id -> time of its oldest unflushed change (caps the debounce).
Because the pending set lives in Redis, any worker can finish a flush that another one scheduled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from state.codec import DEFAULT_CODEC, Codec, checksum
from state.errors import CommunicationFailure, ContextCorruption, VersionConflict
from state.l1 import ConfigEntry
from state.models import RunContext

T = TypeVar("T")

# Compare-and-set of a context, scheduling of its write-behind and the invalidation broadcast, in one
# atomic step. Returns {status, version}: 1 = committed, 0 = stale write (version holds the current
# one), -1 = entry missing though a version was expected.
_COMMIT = """
local cur = redis.call('HGET', KEYS[1], 'v')
local expected = tonumber(ARGV[1])
if cur == false then
  if expected ~= 0 then return {-1, 0} end
elseif tonumber(cur) ~= expected then
  return {0, tonumber(cur)}
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'c', ARGV[4], 'd', ARGV[3])
redis.call('PERSIST', KEYS[1])
local now = tonumber(ARGV[5])
local first = redis.call('HGET', KEYS[3], ARGV[8])
if first == false then
  redis.call('HSET', KEYS[3], ARGV[8], ARGV[5])
  first = now
else
  first = tonumber(first)
end
redis.call('ZADD', KEYS[2], math.min(now + tonumber(ARGV[6]), first + tonumber(ARGV[7])), ARGV[8])
if ARGV[9] ~= '' then
  redis.call('PUBLISH', ARGV[9], cjson.encode({type = 'context', id = ARGV[8], version = tonumber(ARGV[2])}))
end
return {1, tonumber(ARGV[2])}
"""

# Fill from L3: never replaces a newer (or dirty) entry. Returns 1 if written.
_FILL = """
local cur = redis.call('HGET', KEYS[1], 'v')
if cur ~= false and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'c', ARGV[3], 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# After an L3 write of version ARGV[1]: if nothing newer was committed meanwhile, the entry is clean.
# Otherwise the newer changes wait for a write of their own, their window starting now (ARGV[4]).
_MARK_FLUSHED = """
local cur = redis.call('HGET', KEYS[1], 'v')
if cur ~= false and tonumber(cur) > tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
  redis.call('ZADD', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[5]), ARGV[3])
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[3])
if cur ~= false then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# Claim the flushes that are due: each is pushed ARGV[2] seconds ahead, so one process dispatches
# it; if that process dies before the flush, it comes due again when the lease runs out.
_CLAIM_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
end
return ids
"""

# Evict a context entry unless it is newer than ARGV[1] (-1: unconditionally).
_EVICT = """
local cur = redis.call('HGET', KEYS[1], 'v')
if cur == false then return 0 end
if tonumber(ARGV[1]) >= 0 and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class StoredContext:
    """A context as read from L2, with the version and checksum it was stored under."""

    context: RunContext
    version: int
    dirty: bool


class RedisTier:
    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "runctx",
        context_ttl_s: int = 900,
        config_ttl_s: int = 3600,
        codec: Codec = DEFAULT_CODEC,
        broadcast_commits: bool = True,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.context_ttl_s = context_ttl_s
        self.config_ttl_s = config_ttl_s
        self.codec = codec
        self.control_channel = f"{prefix}:control"
        # Commits announce themselves on the control channel, so other processes drop older L1 copies.
        self._commit_channel = self.control_channel if broadcast_commits else ""
        self._due_key = f"{prefix}:wb:due"
        self._first_key = f"{prefix}:wb:first"
        self._commit = client.register_script(_COMMIT)
        self._fill = client.register_script(_FILL)
        self._mark_flushed = client.register_script(_MARK_FLUSHED)
        self._evict = client.register_script(_EVICT)
        self._claim_due = client.register_script(_CLAIM_DUE)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "RedisTier":
        # Named connections: CLIENT LIST shows which process holds which (runctx-<pid>).
        client = redis.Redis.from_url(url, socket_timeout=10, health_check_interval=30, client_name=f"runctx-{os.getpid()}")
        return cls(client, **kwargs)

    def context_key(self, context_id: str) -> str:
        return f"{self.prefix}:ctx:{context_id}"

    def config_key(self, key: str) -> str:
        return f"{self.prefix}:cfg:{key}"

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise CommunicationFailure("L2 (Redis)", exc) from exc

    # ---- contexts ------------------------------------------------------------------------

    def get_context(self, context_id: str) -> StoredContext | None:
        """The stored context, checked against its checksum; ContextCorruption if it fails."""
        key = self.context_key(context_id)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(key, "v", "c", "d")
            pipe.zscore(self._due_key, context_id)
            (version, stored_sum, payload), due = self._call(pipe.execute)
        if version is None and payload is None:
            return None
        if version is None or stored_sum is None or payload is None:
            raise ContextCorruption(key, "entry is missing its version, checksum or payload")
        if checksum(payload) != stored_sum.decode():
            raise ContextCorruption(key, "checksum does not match payload")
        ctx = self.codec.load_context(payload, key=key)
        if ctx.version != int(version):
            raise ContextCorruption(key, f"payload holds version {ctx.version}, entry says {int(version)}")
        return StoredContext(context=ctx, version=ctx.version, dirty=due is not None)

    def commit_context(
        self, ctx: RunContext, *, expected_version: int, now: float, debounce_s: float, max_delay_s: float
    ) -> bool:
        """CAS ``ctx`` (already carrying its new version) over ``expected_version``; schedule its L3 write.

        Returns False when the entry is missing (expired) though a version was expected: the
        caller refills it from L3 and tries again. Raises VersionConflict on a stale write.
        """
        payload = self.codec.dump_context(ctx)
        key = self.context_key(ctx.context_id)
        status, actual = self._call(
            lambda: self._commit(
                keys=[key, self._due_key, self._first_key],
                args=[
                    expected_version, ctx.version, payload, checksum(payload), now, debounce_s, max_delay_s,
                    ctx.context_id, self._commit_channel,
                ],
            )
        )
        if status == 0:
            raise VersionConflict("L2", key, expected_version, int(actual))
        return status == 1

    def fill_context(self, ctx: RunContext) -> bool:
        """Store a clean copy read from L3, unless L2 already holds that version or a newer one."""
        payload = self.codec.dump_context(ctx)
        return bool(
            self._call(
                lambda: self._fill(
                    keys=[self.context_key(ctx.context_id)],
                    args=[ctx.version, payload, checksum(payload), self.context_ttl_s],
                )
            )
        )

    def mark_flushed(self, context_id: str, version: int, *, now: float, debounce_s: float) -> bool:
        """Unschedule the L3 write and start the TTL; if a newer version came meanwhile, schedule it anew."""
        return bool(
            self._call(
                lambda: self._mark_flushed(
                    keys=[self.context_key(context_id), self._due_key, self._first_key],
                    args=[version, self.context_ttl_s, context_id, now, debounce_s],
                )
            )
        )

    def evict_context(self, context_id: str, up_to_version: int | None = None) -> bool:
        """Drop an entry (and its pending write); with ``up_to_version``, only if it is not newer."""
        return bool(
            self._call(
                lambda: self._evict(
                    keys=[self.context_key(context_id), self._due_key, self._first_key],
                    args=[-1 if up_to_version is None else up_to_version, context_id],
                )
            )
        )

    def drop_corrupt(self, context_id: str) -> None:
        self.evict_context(context_id)

    def due_time(self, context_id: str) -> float | None:
        """When a context's pending L3 write is due, or None if it has none."""
        return self._call(lambda: self.client.zscore(self._due_key, context_id))

    def claim_due(self, now: float, *, lease_s: float, limit: int = 100) -> list[str]:
        """The contexts whose L3 write is due, claimed for ``lease_s`` by the caller."""
        ids = self._call(lambda: self._claim_due(keys=[self._due_key], args=[now, lease_s, limit]))
        return [raw.decode() for raw in ids]

    def pending_flushes(self) -> int:
        return int(self._call(lambda: self.client.zcard(self._due_key)))

    def next_due(self) -> float | None:
        """When the earliest pending L3 write is due, or None if nothing waits."""
        first = self._call(lambda: self.client.zrange(self._due_key, 0, 0, withscores=True))
        return first[0][1] if first else None

    # ---- routine definitions and configurations --------------------------------------------

    def get_config(self, key: str) -> ConfigEntry | None:
        redis_key = self.config_key(key)
        version, stored_sum, payload = self._call(lambda: self.client.hmget(redis_key, "v", "c", "d"))
        if payload is None:
            return None
        if version is None or stored_sum is None or checksum(payload) != stored_sum.decode():
            self._call(lambda: self.client.delete(redis_key))
            raise ContextCorruption(redis_key, "checksum does not match payload")
        return ConfigEntry(key=key, version=int(version), data=self.codec.load_document(payload, key=redis_key))

    def put_config(self, entry: ConfigEntry) -> None:
        payload = self.codec.dump_document(entry.data)
        redis_key = self.config_key(entry.key)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(redis_key, mapping={"v": entry.version, "c": checksum(payload), "d": payload})
            pipe.expire(redis_key, self.config_ttl_s)
            self._call(pipe.execute)

    def evict_config(self, key: str) -> bool:
        return bool(self._call(lambda: self.client.delete(self.config_key(key))))

    def ping(self) -> bool:
        return bool(self._call(self.client.ping))
