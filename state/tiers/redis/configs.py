"""L2's routine definitions and configurations on Redis: a hash {v, c, d} per cache key, with a TTL."""

from __future__ import annotations

from state.errors import ContextCorruption
from state.tiers.data import ConfigEntry
from state.tiers.redis.connection import RedisConnection


class RedisConfigs(RedisConnection):
    """Cached definitions and configurations (`L2Configs`): checksummed, dropped when damaged."""

    def get_config(self, key: str) -> ConfigEntry | None:
        redis_key = self.keys.config(key)
        version, stored_sum, payload = self._call(lambda: self.client.hmget(redis_key, "v", "c", "d"))
        if payload is None:
            return None
        if version is None or stored_sum is None or not self.codec.verify(payload, stored_sum.decode(), where=redis_key):
            self._call(lambda: self.client.delete(redis_key))
            raise ContextCorruption(redis_key, "checksum does not match payload")
        return ConfigEntry(key=key, version=int(version), data=self.codec.load_document(payload, key=redis_key))

    def put_config(self, entry: ConfigEntry) -> None:
        payload = self.codec.dump_document(entry.data)
        redis_key = self.keys.config(entry.key)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(redis_key, mapping={"v": entry.version, "c": self.codec.checksum(payload), "d": payload})
            pipe.expire(redis_key, self.config.l2_config_ttl_s)
            self._call(pipe.execute)

    def evict_config(self, key: str) -> bool:
        return bool(self._call(lambda: self.client.delete(self.keys.config(key))))

    def config_keys(self) -> list[str]:
        start = len(self.keys.config(""))
        return [key.decode()[start:] for key in self._call(lambda: list(self.client.scan_iter(match=self.keys.config("*"), count=1000)))]
