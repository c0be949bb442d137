"""The tiered store: L1 (process LRU) -> L2 (Redis) -> L3 (PostgreSQL), the one way state is read and written.

Reads go down the tiers and fill the faster ones on the way back; a caller may ask for
"at least version N" and an older entry counts as a miss. A unit of work (a step) commits its
changes as one compare-and-set on L2, which also schedules the debounced write-behind to L3;
``flush`` performs that write, and any process may do it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from state.change_events import ChangeEvent
from state.codec import Codec
from state.errors import (
    ContextCorruption,
    InvalidValue,
    LineageLost,
    NotFound,
    RunFailed,
    SettingsError,
    StaleEpoch,
    TransactionFailed,
    VersionConflict,
    log_error,
)
from state.keys import CacheKey, config_key, routine_key
from state.metrics import metrics
from state.models import RunContext, RunContextInit, StateCacheConfig
from state.sealing import Keyring, binding
from state.settings import Settings
from state.tiers.contracts import (
    CommitResult,
    CommittedState,
    ConfigEntry,
    ExportRecord,
    L1Tier,
    L2Tier,
    L3Tier,
    Outbox,
    RunRow,
    StepReport,
)
from state.tiers.local import LocalCache

log = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 200  # a step's compare-and-set may lose this many times to concurrent writers

# Given the context a step's commit will store and the state its successor's message may carry,
# the message of that successor (None: it is sent after the commit instead).
Follow = Callable[[RunContext, "CommittedState | None"], "Outbox | None"]


@dataclass(frozen=True)
class StepCommit:
    """The context after a step's commit, and whether this commit applied the step."""

    context: RunContext
    applied: bool  # False: the step had been applied already (a duplicate delivery)
    dispatched: bool = False  # the commit carried what follows the step (its outbox message)


@functools.cache
def _cache_reads(tier: str, result: str) -> Any:
    """The counter of one (tier, result): resolved once, not at every read (an L1 hit is a dict lookup)."""
    return metrics().cache_reads.labels(tier, result)


@dataclass
class StoreStats:
    """What the tiers did, for `runctx check`, tests and (through ``state.metrics``) Prometheus."""

    l1_hits: int = 0
    l2_hits: int = 0
    l3_hits: int = 0
    l2_commits: int = 0
    l3_writes: int = 0
    conflicts: int = 0
    corruptions_healed: int = 0

    def served(self, tier: str) -> None:
        """A read was served by ``tier`` ("l1", "l2" or "l3"); the tiers above it missed."""
        if tier == "l1":
            self.l1_hits += 1
            _cache_reads("l1", "hit").inc()
            return
        _cache_reads("l1", "miss").inc()
        if tier == "l2":
            self.l2_hits += 1
            _cache_reads("l2", "hit").inc()
            return
        self.l3_hits += 1
        _cache_reads("l2", "miss").inc()
        _cache_reads("l3", "hit").inc()

    def committed(self) -> None:
        self.l2_commits += 1
        metrics().l2_commits.inc()

    def conflicted(self) -> None:
        self.conflicts += 1
        metrics().l2_conflicts.inc()

    def wrote_l3(self, kind: str) -> None:
        self.l3_writes += 1
        metrics().l3_writes.labels(kind).inc()


@dataclass
class PruneReport:
    """What a prune deleted."""

    runs: int = 0
    contexts: int = 0


class TieredStore:
    """The one way runctx reads and writes state: owns a process's view of the three tiers.

    Promises: a read never returns a context older than the version asked for (an older copy in
    a faster tier is a miss); a commit is a compare-and-set on L2, so no update is lost; every
    committed change reaches L3 by the write-behind, whichever process does it; a corrupt L2 entry
    is dropped and reloaded from L3, never served.
    """

    def __init__(
        self,
        l1: L1Tier,
        l2: L2Tier,
        l3: L3Tier,
        *,
        config: StateCacheConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.config = config
        self.clock = clock
        self.stats = StoreStats()

    @classmethod
    def connect(
        cls, redis_url: str, database_url: str, *, config: StateCacheConfig, prefix: str, keyring: Keyring | None = None
    ) -> TieredStore:
        """A store on a real Redis and PostgreSQL; with ``keyring``, sensitive values are sealed."""
        from state.tiers.postgres_l3 import PostgresTier
        from state.tiers.redis_l2 import RedisTier

        codec = Codec(keyring)
        return cls(
            LocalCache(config),
            RedisTier.from_url(redis_url, prefix=prefix, config=config, codec=codec),
            PostgresTier.from_url(database_url, config=config, codec=codec),
            config=config,
        )

    @classmethod
    def from_settings(cls, settings: Settings, redis_url: str, database_url: str) -> TieredStore:
        """A store configured by the RUNCTX_* settings (sizes, TTLs, key prefix, retries, keys)."""
        return cls.connect(
            redis_url, database_url, config=settings.cache_config(), prefix=settings.key_prefix, keyring=settings.keyring()
        )

    @classmethod
    def in_memory(cls, *, config: StateCacheConfig | None = None, prefix: str = "mem") -> TieredStore:
        """A store on the in-memory twins of L2 and L3: one process, no servers (engine tests)."""
        from state.tiers.memory_l2 import MemoryL2
        from state.tiers.memory_l3 import MemoryL3

        config = config or StateCacheConfig()
        return cls(LocalCache(config), MemoryL2(prefix=prefix, config=config), MemoryL3(), config=config)

    def close(self) -> None:
        self.l2.close()
        self.l3.close()

    # ---- reading contexts -------------------------------------------------------------------

    def read_context(self, context_id: str, *, at_least: int = 0) -> tuple[RunContext, str]:
        """The context and the tier that served it ("L1", "L2" or "L3"). Treat it as read-only."""
        ctx = self.l1.get_context(context_id, at_least)
        if ctx is not None:
            self.stats.served("l1")
            return ctx, "L1"
        stored = self._read_l2(context_id)
        if stored is not None and stored.version >= at_least:
            self.l1.put_context(stored)
            self.stats.served("l2")
            return stored, "L2"
        ctx = self.l3.get_context(context_id)
        if ctx is None:
            raise NotFound(f"context {context_id!r} is in no tier")
        if ctx.version < at_least:
            newest = max(ctx.version, stored.version if stored else 0)
            raise NotFound(f"context {context_id!r}: asked for version >= {at_least}, the newest stored is {newest}")
        self.l2.fill_context(ctx)
        self.l1.put_context(ctx)
        self.stats.served("l3")
        return ctx, "L3"

    def get_context(self, context_id: str, *, at_least: int = 0) -> RunContext:
        return self.read_context(context_id, at_least=at_least)[0]

    def read_newest(self, context_id: str) -> RunContext:
        """The newest version the shared tiers hold (L2, else L3), whatever this process's L1 holds:
        for read models that poll a run another process moves (an L1 copy is only as fresh as the
        invalidations this process heard)."""
        stored = self._read_l2(context_id)
        if stored is not None:
            return stored
        ctx = self.l3.get_context(context_id)
        if ctx is None:
            raise NotFound(f"context {context_id!r} is in no tier")
        return ctx

    def read_for_step(self, context_id: str, *, epoch: int, at_least: int) -> RunContext:
        """The context a step of ``epoch`` needs: its live lineage at version ``at_least`` or newer.

        Never falls through to L3: a step's state lives in L2 until the write-behind, so if L2 no
        longer holds it (lost, corrupt, or only a reader's copy) the versions since the last L3
        write are gone and LineageLost asks for a rewind. StaleEpoch: the run was rewound past
        ``epoch`` (the message is from before that, and is refused).
        """
        ctx = self.l1.get_context(context_id, at_least, epoch)
        if ctx is not None:
            self.stats.served("l1")
            return ctx
        try:
            stored = self.l2.get_context(context_id)
        except ContextCorruption as exc:
            log_error(log, exc, "dropping it; the run goes back to what L3 holds")
            self.l2.evict_context(context_id)
            self.l1.evict_context(context_id)
            self.stats.corruptions_healed += 1
            raise LineageLost(context_id, "its L2 entry was corrupt") from None
        if stored is None:
            raise LineageLost(context_id, f"needs epoch {epoch} version >= {at_least}, L2 holds nothing")
        if stored.epoch > epoch:
            raise StaleEpoch(context_id, epoch, stored.epoch)
        if stored.epoch < epoch or not stored.live or stored.version < at_least:
            raise LineageLost(
                context_id,
                f"needs epoch {epoch} version >= {at_least}, L2 holds epoch {stored.epoch} version {stored.version}"
                + ("" if stored.live else " (a reader's copy)"),
            )
        self.l1.put_context(stored.context)
        self.stats.served("l2")
        return stored.context

    def _read_l2(self, context_id: str) -> RunContext | None:
        try:
            stored = self.l2.get_context(context_id)
        except ContextCorruption as exc:
            # The authoritative copy is in L3: drop the bad entry and let the read go on down.
            log_error(log, exc, "dropping it and reloading from L3")
            self.l2.evict_context(context_id)
            self.l1.evict_context(context_id)
            self.stats.corruptions_healed += 1
            return None
        return None if stored is None else stored.context

    # ---- writing contexts -------------------------------------------------------------------

    def create_context(self, init: RunContextInit | RunContext, *, run: RunRow | None = None) -> RunContext:
        """Create a context at version 1, durably: L3 first (refusing an existing id), then L2 and L1.

        With ``run``, the run's ledger row is inserted in the same L3 transaction (a root context).
        """
        ctx = RunContext.from_init(init) if isinstance(init, RunContextInit) else init
        if ctx.version != 0:
            raise InvalidValue(f"context {ctx.context_id} was already committed (version {ctx.version})")
        ctx.version = 1
        if run is None:
            self.l3.create_context(ctx)
        else:
            self.l3.create_run(run, ctx)
        self.stats.wrote_l3("context")
        self.l2.fill_context(ctx, live=True)
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
                self.stats.conflicted()
                raise VersionConflict("L2", f"context {ctx.context_id}", expected_version, base.version if base else None)
            self.l2.fill_context(base)
            if not self._commit_l2(ctx, expected_version):
                raise VersionConflict("L2", f"context {ctx.context_id}", expected_version, None)
        self.stats.committed()
        self.l1.put_context(ctx)
        return ctx

    def _commit_l2(
        self,
        ctx: RunContext,
        expected_version: int,
        *,
        step_id: str | None = None,
        report: StepReport | None = None,
        outbox: Outbox | None = None,
        encoded: tuple[bytes, str] | None = None,
    ) -> CommitResult:
        try:
            return self.l2.commit_context(
                ctx,
                expected_version=expected_version,
                now=self.clock(),
                debounce_s=self.config.write_behind_debounce_s,
                max_delay_s=self.config.write_behind_max_delay_s,
                expected_epoch=ctx.epoch if step_id else None,
                require_live=step_id is not None,
                step_id=step_id,
                report=report,
                outbox=outbox,
                encoded=encoded,
            )
        except VersionConflict:
            self.stats.conflicted()
            self.l1.evict_context(ctx.context_id, up_to_version=expected_version)
            raise

    def commit_step(
        self,
        context_id: str,
        base: RunContext,
        step_id: str,
        mutate: Callable[[RunContext], None],
        report: Callable[[], StepReport] | None = None,
        follow: Follow | None = None,
    ) -> StepCommit:
        """Apply a step's changes (``mutate``) with its id in ``applied_steps``, as one compare-and-set.

        A refused write (another writer committed first) is re-applied to the newer version; a step
        that L2 holds already (a duplicate delivery) changes nothing. ``base`` is the version the
        step read. ``report`` gives the step's record, written by the same compare-and-set;
        ``follow``, given the context as it will be committed and the `CommittedState` its message
        may carry (None for a context that may not travel), the message of what follows, pushed by
        the same commit where L2 can (``StepCommit.dispatched``). Raises RunFailed if the run failed
        meanwhile (nothing is written).
        """
        if base.has_applied(step_id):
            return StepCommit(base, applied=False)
        latest = base
        for attempt in range(COMMIT_ATTEMPTS):
            working = latest.working_copy()
            mutate(working)
            working.mark_applied(step_id)
            working.version = latest.version + 1
            working.note_step_commit(step_id)
            step_report = report() if report else None
            encoded = outbox = None
            if follow and step_report and self.l2.carries_outbox:
                encoded = self.l2.encode_state(working)  # once: for the commit and for the message
                outbox = follow(working, self._travelling(working, step_id, encoded))
            try:
                result = self._commit_l2(
                    working, latest.version, step_id=step_id, report=step_report, outbox=outbox, encoded=encoded
                )
                if result is CommitResult.ALREADY_APPLIED:
                    self.l1.evict_context(context_id, up_to_version=latest.version)
                    return StepCommit(self.read_for_step(context_id, epoch=base.epoch, at_least=latest.version), applied=False)
                if result is CommitResult.RUN_FAILED:
                    raise RunFailed(base.run_id)
                if not result:
                    raise LineageLost(context_id, "its L2 entry disappeared while the step ran")
                self.stats.committed()
                self.l1.put_context(working)
                return StepCommit(working, applied=True, dispatched=outbox is not None)
            except (VersionConflict, LineageLost) as conflict:
                # Someone committed first, or the lineage changed: take what is there now (told by
                # the refusal itself, or read again, which may refuse the step as stale or ask for
                # a rewind) and re-apply the changes to it.
                self.l1.evict_context(context_id)
                newer = self._newer(latest, conflict.newer) if isinstance(conflict, VersionConflict) else None
                if newer is not None:
                    latest = newer
                    self.l1.put_context(latest)
                else:
                    actual = conflict.actual if isinstance(conflict, VersionConflict) else None
                    latest = self.read_for_step(context_id, epoch=base.epoch, at_least=max(actual or 0, latest.version + 1))
                if latest.has_applied(step_id):
                    return StepCommit(latest, applied=False)
                time.sleep(random.uniform(0, min(0.02, 0.0005 * 2**attempt)))
        raise TransactionFailed(f"commit of step {step_id}", COMMIT_ATTEMPTS, RuntimeError("too many concurrent writers"))

    def _newer(self, latest: RunContext, state: CommittedState | None) -> RunContext | None:
        """The context a refused commit was told of: ``latest`` plus the steps since it, at the state
        that beat it (None if it was told nothing, or what it was told does not check out)."""
        if state is None or state.epoch != latest.epoch or state.version - latest.version != len(state.steps):
            return None
        try:
            ctx = self.l2.decode_state(state.payload, state.checksum, [], key=state.context_id)
        except ContextCorruption as exc:
            log_error(log, exc, "reading it instead")
            return None
        if ctx.version != state.version or ctx.epoch != state.epoch:
            return None
        ctx.continues(latest, state.steps)
        return ctx

    def _travelling(self, ctx: RunContext, step_id: str, encoded: tuple[bytes, str]) -> CommittedState | None:
        """The state a step's commit lets the next step's message carry: a small context without
        confidential or secret values (a broker message is no place for those, sealed or not)."""
        payload, payload_checksum = encoded
        if ctx.holds_sensitive or len(payload) > self.config.l1_update_max_bytes:
            return None
        return CommittedState(ctx.context_id, ctx.version, ctx.epoch, ctx.last_steps() or (step_id,), payload, payload_checksum)

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
            log_error(log, exc, "dropping it, L3 keeps the last good version")
            self.l2.evict_context(context_id)
            self.stats.corruptions_healed += 1
            return False
        if stored is None:
            self.mark_flushed(context_id, 0, epoch=0, expire=False)  # nothing left to write
            return False
        ctx = stored.context
        written = self.l3.write_context(ctx)
        # A running run's contexts keep no TTL: losing one would cost a rewind.
        self.mark_flushed(context_id, ctx.version, epoch=ctx.epoch, expire=not stored.live)
        if written:
            self.stats.wrote_l3("snapshot")
        return written

    def give_up_flush(self, context_id: str) -> None:
        """Stop trying to write a context that L3 refuses for good (its run fails instead)."""
        self.mark_flushed(context_id, 2**53, epoch=2**31, expire=True)

    def mark_flushed(self, context_id: str, version: int, *, epoch: int = 1, expire: bool = False) -> None:
        """Record that L3 holds (``epoch``, ``version``), written by a flush or by a finalize."""
        self.l2.mark_flushed(
            context_id, version, now=self.clock(), debounce_s=self.config.write_behind_debounce_s, epoch=epoch, expire=expire
        )

    # ---- the run ledger ---------------------------------------------------------------------------

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        error: str | None,
        meta: dict[str, Any],
        contexts: list[RunContext],
        exports: list[ExportRecord],
        epoch: int | None = None,
    ) -> bool:
        """Final contexts, exports and status in one L3 transaction; False if the run was final already
        (or, with ``epoch``, rewound past it). Its contexts then get the context TTL in L2."""
        finished = self.l3.finish_run(
            run_id, status=status, error=error, meta=meta, contexts=contexts, exports=exports, epoch=epoch
        )
        if finished:
            self.stats.wrote_l3("run")
            for ctx in contexts:
                self.mark_flushed(ctx.context_id, ctx.version, epoch=ctx.epoch, expire=True)
        return finished

    # ---- rewinding a run whose L2 state was lost ----------------------------------------------------

    def rebuild_lineage(self, run_id: str, from_epoch: int) -> list[RunContext] | None:
        """Start epoch ``from_epoch + 1`` of a run: each context continues from its newest intact state.

        L3's epoch is raised first (so only one process rebuilds, and stale finalizes are refused);
        then each context's live L2 entry of ``from_epoch``, if intact, is moved to the new epoch,
        else L3's snapshot becomes the new live entry. Returns the contexts as they now stand in the
        new epoch, or None if the run is finished or someone else rebuilt it already.
        """
        new_epoch = self.l3.begin_rewind(run_id, from_epoch)
        if new_epoch is None:
            return None
        self.stats.wrote_l3("rewind")
        rebuilt = []
        for snapshot in self.l3.run_contexts(run_id):
            rebuilt.append(self._move_to_epoch(snapshot, from_epoch, new_epoch))
        return rebuilt

    def _move_to_epoch(self, snapshot: RunContext, from_epoch: int, new_epoch: int) -> RunContext:
        context_id = snapshot.context_id
        self.l1.evict_context(context_id)
        for _ in range(COMMIT_ATTEMPTS):
            try:
                stored = self.l2.get_context(context_id)
            except ContextCorruption:
                self.l2.evict_context(context_id)
                stored = None
            if stored is None or not stored.live or stored.epoch != from_epoch or stored.version < snapshot.version:
                base = snapshot.working_copy()
                base.epoch = new_epoch
                self.l2.evict_context(context_id)
                if self.l2.fill_context(base, live=True):
                    return base
                continue  # someone wrote meanwhile: look again
            moved = stored.context.working_copy()
            moved.epoch = new_epoch
            try:
                # Same version, new epoch: writers of the old epoch are refused from now on.
                if self.l2.commit_context(
                    moved,
                    expected_version=stored.version,
                    now=self.clock(),
                    debounce_s=self.config.write_behind_debounce_s,
                    max_delay_s=self.config.write_behind_max_delay_s,
                    expected_epoch=from_epoch,
                    require_live=True,
                ):
                    return moved
            except (VersionConflict, LineageLost):
                continue  # a step of the old epoch committed meanwhile: take that one
        raise TransactionFailed(f"rewind of context {context_id}", COMMIT_ATTEMPTS, RuntimeError("too many concurrent writers"))

    # ---- retention --------------------------------------------------------------------------------

    def prune(self, older_than_s: float, *, batch: int = 500) -> PruneReport:
        """Delete the runs that finished more than ``older_than_s`` ago: their ledger rows and context
        snapshots (L3), their L2 entries and run records, and L1 copies. Exports and blackboard
        entries stay. In batches, each one L3 transaction, so a prune may stop anywhere and run again."""
        report = PruneReport()
        while True:
            pruned = self.l3.prune_runs(older_than_s, limit=batch)
            for run_id, context_ids in pruned.items():
                for context_id in context_ids:
                    self.l2.evict_context(context_id)
                    self.l1.evict_context(context_id)
                self.l2.forget_run(run_id)
                report.runs += 1
                report.contexts += len(context_ids)
            if len(pruned) < batch:
                return report

    def discard_context(self, context_id: str) -> None:
        """Forget a context everywhere (a child whose creation the rebuilt lineage has not reached)."""
        self.l3.discard_context(context_id)
        self.l2.evict_context(context_id)
        self.l1.evict_context(context_id)

    def rotate_keys(self, keyring: Keyring, *, batch: int = 100, progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
        """Seal everything again under the newest key of ``keyring`` while runs go on: L3 in batches
        (each its own transaction; an interrupted rotation is resumed by running it again), then
        L2 (clean entries dropped, to be filled again from L3; dirty ones rewritten at their version
        by compare-and-set). The older keys are then forgotten by L3: processes may drop them."""
        old = ({key_id for key_id, _ in keyring.keys[1:]} | self.l3.key_ids()) - {keyring.newest}
        self.l3.record_key(keyring.newest)
        counts = {"l3": 0, "l2": 0}
        while done := self.l3.reseal(old, limit=batch):
            counts["l3"] += done
            if progress:
                progress("l3", counts["l3"])
        for context_id in self.l2.context_ids():
            counts["l2"] += self._reseal_l2(context_id)
        for key in self.l2.config_keys():
            self.l2.evict_config(key)
        self.l3.forget_keys(old)
        return counts

    def _reseal_l2(self, context_id: str) -> int:
        for _ in range(COMMIT_ATTEMPTS):
            try:
                stored = self.l2.get_context(context_id)
            except ContextCorruption:
                self.l2.evict_context(context_id)
                return 1
            if stored is None:
                return 0
            if not stored.dirty:
                self.l2.evict_context(context_id, up_to_version=stored.version)
                return 1
            try:
                if self.l2.commit_context(  # the same version, sealed and authenticated anew
                    stored.context, expected_version=stored.version, now=self.clock(),
                    debounce_s=self.config.write_behind_debounce_s, max_delay_s=self.config.write_behind_max_delay_s,
                    expected_epoch=stored.epoch,
                ):
                    return 1
            except (VersionConflict, LineageLost):
                continue  # a step committed meanwhile: under the newest key already; look again
        return 0

    def key_ids(self) -> set[str]:
        """The ids of every key stored values were sealed under (L3 records them)."""
        return self.l3.key_ids()

    def check_keys(self, keyring: Keyring) -> None:
        """Refuse to go on if L3 holds values sealed under a key this process lacks; record the newest."""
        missing = sorted(self.l3.key_ids() - {key_id for key_id, _ in keyring.keys})
        if missing:
            raise SettingsError(
                "RUNCTX_ENCRYPTION_KEYS",
                f"the database holds values sealed under key(s) {', '.join(missing)}, which this process does not "
                "have: give it the same keys as the others (newest first)",
            )
        self.l3.record_key(keyring.newest)

    def keep_hidden_error(self, run_id: str, step_id: str, text: str) -> None:
        """Keep the real error text of a step that read sensitive values, sealed (only with keys: an
        in-memory store without them keeps nothing), for `runs.meta` at finalize."""
        keyring = getattr(self.l2, "codec", None) and self.l2.codec.keyring  # type: ignore[attr-defined]
        if keyring is None:
            return
        sealed = keyring.seal({"step": step_id, "error": text}, binding(run_id, run_id, "error", step_id, "secret"))
        self.l2.keep_hidden_error(run_id, sealed)

    def mark_failed(self, run_id: str, error: str) -> bool:
        """Flag the run failed in L2 (True for the first flag) and in this process's L1."""
        first = self.l2.mark_failed(run_id, error)
        self.l1.note_run_ended(run_id)
        return first

    def list_runs(self, *, status: str | None = None, routine: str | None = None, limit: int = 50) -> list[RunRow]:
        return self.l3.list_runs(status=status, routine=routine, limit=limit)

    def running_runs(self, limit: int = 1000) -> list[RunRow]:
        return self.l3.running_runs(limit)

    def get_run(self, run_id: str) -> RunRow | None:
        return self.l3.get_run(run_id)

    # ---- invalidation -----------------------------------------------------------------------

    def evict_context(self, context_id: str, *, up_to_version: int | None = None) -> None:
        self.l2.evict_context(context_id, up_to_version)
        self.l1.evict_context(context_id, up_to_version)

    def take_commit(self, context_id: str, version: int, *, state: CommittedState | None = None) -> bool:
        """Another process committed ``version`` (heard from its broadcast, or carried by the message
        of the step that follows it): drop older L1 copies, or, given its ``state`` while this L1
        holds one of the versions its steps lead from, take it, so that a step here finds it in L1.
        Returns whether L1 now holds ``version``."""
        if state is not None and state.context_id == context_id and state.version == version:
            return self.l1.follow(state, self._decode_followed(context_id))
        self.l1.evict_context(context_id, up_to_version=version - 1)
        return False

    def _decode_followed(self, context_id: str) -> Callable[[bytes, str], RunContext]:
        def decode(payload: bytes, payload_checksum: str) -> RunContext:
            try:
                return self.l2.decode_state(payload, payload_checksum, [], key=context_id)
            except ContextCorruption as exc:
                log_error(log, exc, "ignoring the state another process committed (a read from L2 takes its place)")
                raise

        return decode

    def handle_change(self, event: ChangeEvent) -> None:
        """Apply an L3 change event to L2 and this process's L1."""
        if event.kind == "context":
            if event.origin == "runctx":
                return  # runctx wrote L3 from L2: L2 is already as new as this
            self._reconcile_sql_change(event.context_id, event.version or 0)
        else:
            for key in event.cache_keys:
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
                self.l2.evict_context(context_id)
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
            self.stats.served("l1")
            return entry
        try:
            entry = self.l2.get_config(key)
        except ContextCorruption as exc:
            log_error(log, exc, "reloading from L3")
            self.stats.corruptions_healed += 1
            entry = None
        if entry is not None:
            self.stats.served("l2")
        else:
            entry = load()
            if entry is None:
                raise NotFound(f"{key} is in no tier")
            self.stats.served("l3")
            self.l2.put_config(entry)
        self.l1.put_config(entry)
        return entry

    def get_config(self, kind: str, name: str) -> ConfigEntry:
        return self._cached_config(config_key(kind, name), lambda: self.l3.get_config(kind, name))

    def put_config(self, kind: str, name: str, data: Any, *, expected_version: int | None = None) -> int:
        version = self.l3.put_config(kind, name, data, expected_version=expected_version)
        self.stats.wrote_l3("config")
        self._forget_config(config_key(kind, name))
        return version

    def get_routine(self, name: str, version: int | None = None) -> ConfigEntry:
        """A routine definition: the newest or one stored version."""
        return self._cached_config(routine_key(name, version), lambda: self.l3.get_routine(name, version))

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
        self.stats.wrote_l3("routine")
        self._forget_config(routine_key(name))
        return version

    def get_cached(self, key: str) -> ConfigEntry:
        """A routine or configuration by its cache key (see `state.keys`)."""
        parsed = CacheKey.parse(key)
        if parsed.kind == "routine":
            return self.get_routine(parsed.name, parsed.version)
        assert parsed.config_kind is not None
        return self.get_config(parsed.config_kind, parsed.name)

    def _forget_config(self, key: str) -> None:
        # The change event does this for every process; doing it here too gives read-after-write.
        self.l2.evict_config(key)
        self.l1.evict_config(key)
