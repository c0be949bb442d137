"""Named leases on Redis: whoever holds one does a job for the whole cluster (the watchdog's scan,
the retention prune) until it stops renewing it."""

from __future__ import annotations

from state.tiers.redis.connection import RedisConnection


class RedisLeases(RedisConnection):
    """`L2Leases`: take or renew a lease in one script (`lua/lease.lua`)."""

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        return bool(self._script("lease", [self.keys.lease(name)], [holder, int(ttl_s * 1000)]))
