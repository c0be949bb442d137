"""The tiered store: L1 (process LRU) -> L2 (Redis) -> L3 (PostgreSQL), the one way state is read and written.

Reads go down the tiers and fill the faster ones on the way back; a caller may ask for
"at least version N" and an older entry counts as a miss. A unit of work (a step) commits its
changes as one compare-and-set on L2, which also schedules the debounced write-behind to L3;
``flush`` performs that write, and any process may do it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from sqlalchemy import Connection

from state.change_events import ChangeEvent
from state.errors import ContextCorruption, NotFound, VersionConflict
from state.l1 import ConfigEntry, LocalCache
from state.l2 import RedisTier
from state.l3 import PostgresTier
from state.models import RunContext, RunContextInit, StateCacheConfig
from state.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class StoreStats:
    """What the tiers did, for `runctx check`, metrics and tests."""

    l1_hits: int = 0
    l2_hits: int = 0
    l3_hits: int = 0
    l2_commits: int = 0
    l3_writes: int = 0
    conflicts: int = 0
    corruptions_healed: int = 0


class TieredStore:
    def __init__(
        self,
        l1: LocalCache,
        l2: RedisTier,
        l3: PostgresTier,
        *,
        config: StateCacheConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.config = config or StateCacheConfig()
        self.clock = clock
        self.stats = StoreStats()

    @classmethod
    def connect(
        cls,
        redis_url: str,
        database_url: str,
        *,
        config: StateCacheConfig | None = None,
        prefix: str = "runctx",
        l1: LocalCache | None = None,
    ) -> "TieredStore":
        config = config or StateCacheConfig()
        return cls(
            l1 or LocalCache(config),
            RedisTier.from_url(
                redis_url, prefix=prefix, context_ttl_s=config.l2_context_ttl_s, config_ttl_s=config.l2_config_ttl_s
            ),
            PostgresTier.from_url(database_url),
            config=config,
        )

    @classmethod
    def from_settings(cls, settings: Settings, redis_url: str, database_url: str) -> "TieredStore":
        """A store configured by the RUNCTX_* settings (sizes, TTLs, key prefix, retries)."""
        config = settings.cache_config()
        return cls(
            LocalCache(config),
            RedisTier.from_url(
                redis_url, prefix=settings.key_prefix, context_ttl_s=config.l2_context_ttl_s, config_ttl_s=config.l2_config_ttl_s
            ),
            PostgresTier.from_url(
                database_url, retry_attempts=settings.l3_retry_attempts, retry_base_delay_s=settings.l3_retry_base_delay_s
            ),
            config=config,
        )

    def close(self) -> None:
        self.l2.client.close()
        self.l3.engine.dispose()

    # ---- reading contexts -------------------------------------------------------------------

    def read_context(self, context_id: str, *, at_least: int = 0) -> tuple[RunContext, str]:
        """The context and the tier that served it ("L1", "L2" or "L3"). Treat it as read-only."""
        ctx = self.l1.get_context(context_id, at_least)
        if ctx is not None:
            self.stats.l1_hits += 1
            return ctx, "L1"
        stored = self._read_l2(context_id)
        if stored is not None and stored.version >= at_least:
            self.l1.put_context(stored)
            self.stats.l2_hits += 1
            return stored, "L2"
        ctx = self.l3.get_context(context_id)
        if ctx is None:
            raise NotFound(f"context {context_id!r} is in no tier")
        if ctx.version < at_least:
            newest = max(ctx.version, stored.version if stored else 0)
            raise NotFound(f"context {context_id!r}: asked for version >= {at_least}, the newest stored is {newest}")
        self.l2.fill_context(ctx)
        self.l1.put_context(ctx)
        self.stats.l3_hits += 1
        return ctx, "L3"

    def get_context(self, context_id: str, *, at_least: int = 0) -> RunContext:
        return self.read_context(context_id, at_least=at_least)[0]

    def _read_l2(self, context_id: str) -> RunContext | None:
        try:
            stored = self.l2.get_context(context_id)
        except ContextCorruption as exc:
            # The authoritative copy is in L3: drop the bad entry and let the read go on down.
            log.error("%s; dropping it and reloading from L3", exc)
            self.l2.drop_corrupt(context_id)
            self.l1.evict_context(context_id)
            self.stats.corruptions_healed += 1
            return None
        return None if stored is None else stored.context

    # ---- writing contexts -------------------------------------------------------------------

    def create_context(
        self, init: RunContextInit | RunContext, *, also: Callable[[Connection], None] | None = None
    ) -> RunContext:
        """Create a context at version 1, durably: L3 first (refusing an existing id), then L2 and L1.

        ``also`` runs in the same L3 transaction (e.g. inserting the run the context belongs to).
        """
        ctx = RunContext.from_init(init) if isinstance(init, RunContextInit) else init
        if ctx.version != 0:
            raise ValueError(f"context {ctx.context_id} was already committed (version {ctx.version})")
        ctx.version = 1

        def work(conn: Connection) -> None:
            self.l3.save_context(conn, ctx, expected_version=0)
            if also is not None:
                also(conn)

        self.l3.run(f"create context {ctx.context_id}", work)
        self.stats.l3_writes += 1
        self.l2.fill_context(ctx)
        self.l1.put_context(ctx)
        return ctx

    def commit(self, ctx: RunContext, *, expected_version: int) -> RunContext:
        """Commit a changed context as version ``expected_version + 1`` (compare-and-set on L2).

        The store takes ownership of ``ctx``: do not change it afterwards. Raises VersionConflict
        when someone else committed first; the caller merges and retries.
        """
        ctx.version = expected_version + 1
        if not self._commit_l2(ctx, expected_version):
            # The L2 entry expired: refill it from L3, the version the caller started from must be there.
            base = self.l3.get_context(ctx.context_id)
            if base is None or base.version != expected_version:
                self.stats.conflicts += 1
                raise VersionConflict(
                    "L2", self.l2.context_key(ctx.context_id), expected_version, base.version if base else None
                )
            self.l2.fill_context(base)
            if not self._commit_l2(ctx, expected_version):
                raise VersionConflict("L2", self.l2.context_key(ctx.context_id), expected_version, None)
        self.stats.l2_commits += 1
        self.l1.put_context(ctx)
        return ctx

    def _commit_l2(self, ctx: RunContext, expected_version: int) -> bool:
        try:
            return self.l2.commit_context(
                ctx,
                expected_version=expected_version,
                now=self.clock(),
                debounce_s=self.config.write_behind_debounce_s,
                max_delay_s=self.config.write_behind_max_delay_s,
            )
        except VersionConflict:
            self.stats.conflicts += 1
            self.l1.evict_context(ctx.context_id, up_to_version=expected_version)
            raise

    @contextlib.contextmanager
    def edit(self, context_id: str, *, at_least: int = 0) -> Iterator[RunContext]:
        """A private copy to change; committed as one compare-and-set when the block ends without error."""
        base = self.get_context(context_id, at_least=at_least)
        working = base.working_copy()
        yield working
        self.commit(working, expected_version=base.version)

    # ---- write-behind L2 -> L3 ----------------------------------------------------------------

    def flush(self, context_id: str) -> bool:
        """Write the L2 version of a context to L3 if it is newer there; returns whether L3 changed."""
        try:
            stored = self.l2.get_context(context_id)
        except ContextCorruption as exc:
            log.error("%s; dropping it, L3 keeps the last good version", exc)
            self.l2.drop_corrupt(context_id)
            self.stats.corruptions_healed += 1
            return False
        if stored is None:
            self.mark_flushed(context_id, 0)  # nothing left to write
            return False
        ctx = stored.context
        written = self.l3.run(f"flush context {context_id}", lambda conn: self.l3.save_context(conn, ctx))
        self.mark_flushed(context_id, ctx.version)
        if written:
            self.stats.l3_writes += 1
        return written

    def mark_flushed(self, context_id: str, version: int) -> None:
        """Record that L3 holds ``version`` (written by a flush or by a finalize)."""
        self.l2.mark_flushed(context_id, version, now=self.clock(), debounce_s=self.config.write_behind_debounce_s)

    # ---- invalidation -----------------------------------------------------------------------

    def evict_context(self, context_id: str, *, up_to_version: int | None = None) -> None:
        self.l2.evict_context(context_id, up_to_version)
        self.l1.evict_context(context_id, up_to_version)

    def handle_change(self, event: ChangeEvent) -> None:
        """Apply an L3 change event to L2 and this process's L1."""
        if event.kind == "context":
            if event.origin == "runctx":
                return  # runctx wrote L3 from L2: L2 is already as new as this
            self._reconcile_sql_change(event.ident, event.version or 0)
        else:
            keys = [event.key] if event.kind == "config" else [event.key, f"{event.key}@{event.version}"]
            for key in keys:
                self.l2.evict_config(key)
                self.l1.evict_config(key)

    def _reconcile_sql_change(self, context_id: str, l3_version: int) -> None:
        """A context changed in L3 outside runctx, now at ``l3_version``.

        A clean L2 copy that is not newer is evicted, so the next read takes the edit. A dirty one
        holds step changes that were acknowledged but not yet written to L3: they are kept, moved
        to a version above the edit's so that the write-behind replaces it (the run's progress
        wins over a concurrent manual edit; nothing acknowledged is lost).
        """
        for _ in range(10):
            try:
                stored = self.l2.get_context(context_id)
            except ContextCorruption:
                self.l2.drop_corrupt(context_id)
                break
            if stored is None or stored.version > l3_version:
                break
            if not stored.dirty:
                self.l2.evict_context(context_id, up_to_version=l3_version)
                break
            kept = stored.context.working_copy()
            kept.version = l3_version + 1
            try:
                if not self._commit_l2(kept, stored.version):
                    continue  # expired meanwhile: look again
                log.warning(
                    "context %s was changed in L3 (version %d) while it had unwritten changes; these are kept as version %d",
                    context_id, l3_version, kept.version,
                )
                break
            except VersionConflict:
                continue  # a step committed meanwhile: look again
        self.l1.evict_context(context_id, up_to_version=l3_version)

    # ---- routine definitions and configurations ------------------------------------------------

    def _cached_config(self, key: str, load: Callable[[], ConfigEntry | None]) -> ConfigEntry:
        entry = self.l1.get_config(key)
        if entry is not None:
            self.stats.l1_hits += 1
            return entry
        try:
            entry = self.l2.get_config(key)
        except ContextCorruption as exc:
            log.error("%s; reloading from L3", exc)
            self.stats.corruptions_healed += 1
            entry = None
        if entry is not None:
            self.stats.l2_hits += 1
        else:
            entry = load()
            if entry is None:
                raise NotFound(f"{key} is in no tier")
            self.stats.l3_hits += 1
            self.l2.put_config(entry)
        self.l1.put_config(entry)
        return entry

    def get_config(self, kind: str, name: str) -> ConfigEntry:
        return self._cached_config(f"config:{kind}:{name}", lambda: self.l3.get_config(kind, name))

    def put_config(self, kind: str, name: str, data: Any, *, expected_version: int | None = None) -> int:
        version = self.l3.put_config(kind, name, data, expected_version=expected_version)
        self._forget_config(f"config:{kind}:{name}")
        return version

    def get_routine(self, name: str, version: int | None = None) -> ConfigEntry:
        """A routine definition: the newest (cached as ``routine:<name>``) or one version (``routine:<name>@<v>``)."""
        if version is None:
            return self._cached_config(f"routine:{name}", lambda: self.l3.get_routine(name))
        return self._cached_config(f"routine:{name}@{version}", lambda: self.l3.get_routine(name, version))

    def put_routine(self, name: str, definition: Any) -> int:
        version = self.l3.put_routine(name, definition)
        self._forget_config(f"routine:{name}")
        return version

    def _forget_config(self, key: str) -> None:
        # The change event does this for every process; doing it here too gives read-after-write.
        self.l2.evict_config(key)
        self.l1.evict_config(key)
