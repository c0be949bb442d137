"""The control bus on Redis: one pub/sub channel every worker process subscribes to. What it carries
is defined in `state.bus`; the commit script publishes the text `state.bus.encode` made."""

from __future__ import annotations

from state import bus
from state.tiers.redis.connection import RedisConnection


class RedisBus(RedisConnection):
    """Publishes `state.bus` messages (`L2Bus`); a tier built with ``broadcast_commits=False``
    publishes nothing (a process that must not disturb the others, e.g. a benchmark's probe)."""

    def publish(self, message: bus.Message) -> int:
        if not self.bus_channel:
            return 0
        text = bus.encode(message)
        return int(self._call(lambda: self.client.publish(self.bus_channel, text)))

    def announce_routine(self, routine: str, version: int) -> None:
        self.publish(bus.RoutineStored(routine, version))
