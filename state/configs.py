"""Routine definitions and configurations through the tiers: read from L1, else L2, else L3 (and
filled on the way back); written to L3, whose change event drops the stale copies everywhere."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from state.codec import Codec
from state.errors import ContextCorruption, NotFound, log_error
from state.keys import CacheKey, config_key, routine_key
from state.limits import canonical_json
from state.metrics import count_l3_write, count_read
from state.tiers.contracts import L1Tier, L2Tier, L3Configs
from state.tiers.data import ConfigEntry

log = logging.getLogger(__name__)


class ConfigCache:
    """Definitions and configurations, cached in L1 and L2 (`L2Configs`, `L2Bus`). Owns nothing but its tiers; promises
    read-after-write in the process that wrote (its own copies dropped at once) and, elsewhere,
    copies no staler than an invalidation or the L1 TTL."""

    def __init__(self, l1: L1Tier, l2: L2Tier, l3: L3Configs, codec: Codec) -> None:
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.codec = codec

    def _cached(self, key: str, load: Callable[[], ConfigEntry | None]) -> ConfigEntry:
        entry = self.l1.get_config(key)
        if entry is not None:
            count_read("l1")
            return entry
        try:
            entry = self.l2.get_config(key)
        except ContextCorruption as exc:
            log_error(log, exc, "reloading from L3")
            entry = None
        if entry is not None:
            count_read("l2")
        else:
            entry = load()
            if entry is None:
                raise NotFound(f"{key} is in no tier")
            count_read("l3")
            self.l2.put_config(entry)
        self.l1.put_config(entry)
        return entry

    def get_config(self, kind: str, name: str) -> ConfigEntry:
        return self._cached(config_key(kind, name), lambda: self.l3.get_config(kind, name))

    def put_config(self, kind: str, name: str, data: Any, *, expected_version: int | None = None) -> int:
        version = self.l3.put_config(kind, name, data, expected_version=expected_version)
        count_l3_write("config")
        self.forget(config_key(kind, name))
        return version

    def get_routine(self, name: str, version: int | None = None) -> ConfigEntry:
        """A routine definition: the newest or one stored version."""
        return self._cached(routine_key(name, version), lambda: self.l3.get_routine(name, version))

    def held(self, key: str) -> ConfigEntry | None:
        """What this process holds in L1 under the cache key ``key``, if anything (no I/O)."""
        return self.l1.get_config(key)

    def cached_routine(self, name: str, version: int) -> ConfigEntry | None:
        """The definition of ``name``@``version`` this process holds in L1, if any (no I/O)."""
        return self.held(routine_key(name, version))

    def cache_routine(self, name: str, version: int, definition: Any) -> ConfigEntry:
        """``definition``, which L3 holds as ``version`` (just stored, or found there), cached in L2
        and L1 under that version's key: its next reads (this process compiling it, a worker's
        first step of a run) cost no L3 read. A stored version never changes."""
        key = routine_key(name, version)
        entry = self.l1.get_config(key)
        if entry is not None and entry.data == definition:
            return entry
        entry = ConfigEntry(key=key, version=version, data=definition)
        self.l2.put_config(entry)
        self.l1.put_config(entry)
        return entry

    def put_routine(self, name: str, definition: Any) -> int:
        version = self.l3.put_routine(name, definition)
        count_l3_write("routine")
        self.forget(routine_key(name))
        return version

    def announce_routine(self, name: str, version: int) -> None:
        """Every process may compile ``name``@``version`` now (a hint on the control bus)."""
        self.l2.announce_routine(name, version)

    def get_cached(self, key: str) -> ConfigEntry:
        """A routine or configuration by its cache key (see `state.keys`)."""
        parsed = CacheKey.parse(key)
        if parsed.kind == "routine":
            return self.get_routine(parsed.name, parsed.version)
        assert parsed.config_kind is not None
        return self.get_config(parsed.config_kind, parsed.name)

    def forget(self, key: str) -> None:
        # The change event does this for every process; doing it here too gives read-after-write.
        self.l2.evict_config(key)
        self.l1.evict_config(key)

    def digest(self, entry: ConfigEntry) -> str:
        """A keyed digest of a definition or configuration: two processes holding the same one give
        the same digest; anyone who can read it cannot tell the value (diagnostics)."""
        return self.codec.checksum(canonical_json(entry.data).encode())
