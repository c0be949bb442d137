"""Named leases on Redis: whoever holds one does a job for the whole cluster (the watchdog's scan,
the retention prune) until it stops renewing it. And the heartbeat counter by which processes
notice that Redis lost or went back on what it held, with the note of when one did."""

from __future__ import annotations

from state.tiers.redis.connection import RedisConnection


class RedisLeases(RedisConnection):
    """`L2Leases`: take or renew a lease in one script (`lua/lease.lua`); count heartbeats (INCR)."""

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        return bool(self._script("lease", [self.keys.lease(name)], [holder, int(ttl_s * 1000)]))

    def count_heartbeat(self) -> int:
        return int(self._call(lambda: self.client.incr(self.keys.continuity())))

    def note_loss(self, at: float, ttl_s: float) -> None:
        self._call(lambda: self.client.set(self.keys.loss(), repr(at), nx=True, px=int(ttl_s * 1000)))

    def claim_loss_resume(self, run_id: str, ttl_s: float) -> bool:
        return bool(self._call(lambda: self.client.set(self.keys.loss(run_id), "1", nx=True, px=int(ttl_s * 1000))))

    def loss_noted(self) -> float | None:
        raw = self._call(lambda: self.client.get(self.keys.loss()))
        try:
            return None if raw is None else float(raw)
        except ValueError:  # garbage: as good as no note
            return None
