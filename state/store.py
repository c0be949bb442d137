"""The tiered store: L1 (process LRU) -> L2 (Redis) -> L3 (PostgreSQL), the one way state is read and written.

Reads go down the tiers and fill the faster ones on the way back; a caller may ask for "at least
version N" and an older entry counts as a miss. A change is committed by one compare-and-set on L2
(`try_commit`: one attempt, told what beat it when it loses), which also schedules the debounced
write-behind to L3; ``flush`` performs that write, and any process may do it.

The store is also where the rest of runctx finds the services built on the same tiers, so that
nothing outside `state/` touches a tier:

    store.configs       routine definitions and configurations  (`state.configs`)
    store.ledger        runs and their records                   (`state.ledger`)
    store.history       runs' histories                          (`state.run_history`)
    store.waits         waits for outside events and signals     (`state.waits`)
    store.blobs         large values stored once, by reference   (`state.blobs`)
    store.rewinds       rebuilding a run whose L2 state was lost (`state.rewind`)
    store.invalidation  other processes' commits and L3's change events (`state.invalidation`)
    store.maintenance   prune, key checks and rotation           (`state.maintenance`)
    store.bus           the control bus (its messages: `state.bus`)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from state.blobs import Blobs
from state.codec import DEFAULT_CODEC, Codec
from state.configs import ConfigCache
from state.errors import ContextCorruption, DetachedNotHeld, InvalidValue, LineageLost, NotFound, RunFailed, StaleEpoch, VersionConflict, log_error
from state.invalidation import Invalidation
from state.ledger import RunLedger
from state.maintenance import Maintenance
from state.metrics import count_l3_write, count_read, metrics
from state.models import RunContext, RunContextInit, StateCacheConfig
from state.rewind import Rewinds
from state.run_history import RunHistory
from state.sealing import Keyring
from state.settings import Settings
from state.tiers.contracts import L1Tier, L2Bus, L2Tier, L3Tier, ObjectStore
from state.tiers.data import CommitRequest, CommitStatus, CommittedState, OutboxRoute, RunRow
from state.tiers.local import LocalCache
from state.waits import Waits
from state.write_behind import WriteBehind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Committed:
    """The commit applied: ``context`` is now the newest version (and this process's L1 copy)."""

    context: RunContext


@dataclass(frozen=True)
class Refused:
    """Another writer committed first (or the entry is of another lineage): nothing was written.
    ``newer``: the context that beat it, continued from the base the commit started from, when L2
    could tell it in the same reply; else read it (at least ``actual_version``)."""

    actual_version: int | None
    newer: RunContext | None = None


@dataclass(frozen=True)
class AlreadyApplied:
    """A step's commit found its step applied already (a duplicate delivery): nothing was written."""


class TieredStore:
    """The one way runctx reads and writes state: owns a process's view of the three tiers.

    Promises: a read never returns a context older than the version asked for (an older copy in
    a faster tier is a miss); a commit is a compare-and-set on L2, so no update is lost; every
    committed change reaches L3 by the write-behind, whichever process does it; a corrupt L2 entry
    is dropped and reloaded from L3, never served.
    """

    def __init__(
        self, l1: L1Tier, l2: L2Tier, l3: L3Tier, *, config: StateCacheConfig, codec: Codec = DEFAULT_CODEC,
        clock: Callable[[], float] = time.time, objects: ObjectStore | None = None,
    ) -> None:
        """``objects``: where large values are kept, if not in L3 (`state.blobs`)."""
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.config = config
        self.codec = codec  # the tiers' own: it seals values and authenticates payloads
        self.clock = clock
        self.bus: L2Bus = l2  # the control bus, for those who announce things on it
        self.configs = ConfigCache(l1, l2, l3, codec)
        self.history = RunHistory(l2, l3, codec=codec, clock=clock, keep=config.history)
        self.ledger = RunLedger(l1, l2, l3, codec=codec, clock=clock, history=self.history)
        self.rewinds = Rewinds(l1, l2, l3, clock=clock)
        self.invalidation = Invalidation(l1, l2, clock=clock)
        self.blobs = Blobs(l3, codec, objects=objects)
        self.maintenance = Maintenance(l1, l2, l3, clock=clock, blobs=self.blobs)
        self.write_behind = WriteBehind(l1, l2, l3, clock=clock, history=self.history)
        self.waits = Waits(l3, codec)

    @classmethod
    def connect(
        cls, redis_url: str, database_url: str, *, config: StateCacheConfig, prefix: str, keyring: Keyring | None = None,
        blob_url: str = "", deployment: str | None = None,
    ) -> TieredStore:
        """A store on a real Redis and PostgreSQL; with ``keyring``, sensitive values are sealed; with
        ``blob_url`` (s3://bucket/prefix), large values are kept there; it sees ``deployment``'s runs."""
        from state.tiers.postgres import PostgresTier
        from state.tiers.redis import RedisTier
        from state.tiers.s3 import S3Objects

        codec = Codec(keyring)
        l2 = RedisTier.from_url(redis_url, prefix=prefix, config=config, codec=codec)
        l3 = PostgresTier.from_url(database_url, config=config, codec=codec, deployment=deployment or prefix)
        return cls(LocalCache(config), l2, l3, config=config, codec=codec, objects=S3Objects(blob_url) if blob_url else None)

    @classmethod
    def from_settings(cls, settings: Settings, redis_url: str, database_url: str) -> TieredStore:
        """A store configured by the RUNCTX_* settings (sizes, TTLs, key prefix, retries, keys)."""
        return cls.connect(
            redis_url, database_url, config=settings.cache_config(), prefix=settings.key_prefix, keyring=settings.keyring(),
            blob_url=settings.blob_url, deployment=settings.deployment_name,
        )

    @classmethod
    def in_memory(cls, *, config: StateCacheConfig | None = None, prefix: str = "mem") -> TieredStore:
        """A store on the in-memory twins of L2 and L3: one process, no servers (engine tests)."""
        from state.tiers.memory import MemoryL2, MemoryL3

        config = config or StateCacheConfig()
        return cls(LocalCache(config), MemoryL2(prefix=prefix, config=config), MemoryL3(), config=config)

    def close(self) -> None:
        self.l2.close()
        self.l3.close()

    def ping(self) -> tuple[bool, bool]:
        """Whether L2 and L3 answer (each raises CommunicationFailure if it cannot be reached)."""
        return self.l2.ping(), self.l3.ping()

    # ---- reading contexts -------------------------------------------------------------------

    def read_context(self, context_id: str, *, at_least: int = 0) -> tuple[RunContext, str]:
        """The context and the tier that served it ("L1", "L2" or "L3"). Treat it as read-only."""
        ctx = self.l1.get_context(context_id, at_least)
        if ctx is not None:
            count_read("l1")
            return ctx, "L1"
        stored = self._read_l2(context_id)
        if stored is not None and stored.version >= at_least:
            self.l1.put_context(stored)
            count_read("l2")
            return stored, "L2"
        ctx = self.l3.get_context(context_id)
        if ctx is None:
            raise NotFound(f"context {context_id!r} is in no tier")
        if ctx.version < at_least:
            newest = max(ctx.version, stored.version if stored else 0)
            raise NotFound(f"context {context_id!r}: asked for version >= {at_least}, the newest stored is {newest}")
        self.l2.fill_context(ctx)
        self.l1.put_context(ctx)
        count_read("l3")
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
            count_read("l1")
            return ctx
        try:
            stored = self.l2.get_context(context_id)
        except ContextCorruption as exc:
            log_error(log, exc, "dropping it; the run goes back to what L3 holds")
            self.evict_context(context_id)
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
        count_read("l2")
        return stored.context

    def read_many_for_step(self, context_ids: list[str], *, epoch: int) -> list[RunContext]:
        """Each context's newest state in L2, as `read_for_step` finds it, not L1's: a fan-out's items."""
        for context_id in context_ids:
            self.l1.evict_context(context_id)
        return [self.read_for_step(context_id, epoch=epoch, at_least=1) for context_id in context_ids]

    def _read_l2(self, context_id: str) -> RunContext | None:
        try:
            stored = self.l2.get_context(context_id)
        except ContextCorruption as exc:
            # The authoritative copy is in L3: drop the bad entry and let the read go on down.
            log_error(log, exc, "dropping it and reloading from L3")
            self.evict_context(context_id)
            return None
        return None if stored is None else stored.context

    def read_l3(self, context_id: str) -> RunContext | None:
        """L3's snapshot of a context, if it holds one (what a run's finalize or write-behind wrote)."""
        return self.l3.get_context(context_id)

    def l3_contexts(self, run_id: str) -> list[RunContext]:
        """Every context of a run as L3 holds it."""
        return self.l3.run_contexts(run_id)

    def versions_of(self, context_id: str) -> tuple[Any, RunContext | None]:
        """What L2 and L3 each hold of a context (L2's `StoredContext`, or None; L3's snapshot), for
        read models that show both. A damaged L2 entry shows as none."""
        try:
            stored = self.l2.get_context(context_id)
        except ContextCorruption:
            stored = None
        return stored, self.l3.get_context(context_id)

    # ---- writing contexts -------------------------------------------------------------------

    def create_context(self, init: RunContextInit | RunContext, *, run: RunRow | None = None) -> RunContext:
        """Create a context at version 1, durably: L3 first (refusing an existing id), then L2 and L1.

        With ``run``, the run's ledger row is inserted in the same L3 transaction (a root context).
        """
        ctx = RunContext.from_init(init) if isinstance(init, RunContextInit) else init
        if ctx.version != 0:
            raise InvalidValue(f"context {ctx.context_id} was already committed (version {ctx.version})")
        ctx.version = 1
        self.blobs.claim_check(ctx)
        if run is None:
            self.l3.create_context(ctx)
        else:
            self.l3.create_run(run, ctx)
        count_l3_write("context")
        self.l2.fill_context(ctx, live=True)
        self.l1.put_context(ctx)
        return ctx

    def create_contexts(self, contexts: list[RunContext]) -> int:
        """Create many contexts at version 1 (a fan-out's items): L3 in one statement, then L2 (not
        L1: most are read by other processes). Those that exist are left as they are (a fan-out
        started again creates nothing twice). Returns how many were new in L3."""
        for ctx in contexts:
            ctx.version = 1
            self.blobs.claim_check(ctx)
        created = self.l3.create_contexts(contexts)
        count_l3_write("context")
        self.l2.fill_contexts(contexts, live=True)
        return created

    def try_commit(self, request: CommitRequest, *, base: RunContext | None = None) -> Committed | Refused | AlreadyApplied:
        """One compare-and-set of ``request.context`` (the store owns it from now on). ``base``: the
        context it was made from, which a refused step's commit is told the newer state relative to.
        Raises RunFailed when a step's run failed meanwhile, and LineageLost when a step's L2 entry
        is gone or damaged (the run is rewound)."""
        now = self.clock()
        self.blobs.claim_check(request.context, request.context.touched())
        request = self.history.attach(request, now)
        reply = self.l2.commit(request, now=now)
        ctx = request.context
        if reply.status is CommitStatus.COMMITTED:
            metrics().l2_commits.inc()
            self.l1.put_context(ctx)
            return Committed(ctx)
        if reply.status is CommitStatus.ALREADY_APPLIED:
            self.l1.evict_context(ctx.context_id, up_to_version=request.expected_version)
            return AlreadyApplied()
        if reply.status is CommitStatus.RUN_FAILED:
            raise RunFailed(ctx.run_id)
        if reply.status is CommitStatus.NO_ENTRY:
            if request.step_id is not None:
                raise LineageLost(ctx.context_id, "its L2 entry disappeared while the step ran")
            return Refused(None)
        metrics().l2_conflicts.inc()
        other_lineage = reply.status is CommitStatus.OTHER_LINEAGE
        self.l1.evict_context(ctx.context_id, up_to_version=None if other_lineage else request.expected_version)
        newer = self._newer(base, reply.newer) if reply.newer is not None and base is not None else None
        if newer is not None:
            self.l1.put_context(newer)
        return Refused(reply.actual_version, newer)

    def _newer(self, base: RunContext, state: CommittedState) -> RunContext | None:
        """The context a refused commit was told of: ``base`` plus the steps since it, at the state
        that beat it (None if what it was told does not check out: it is read instead)."""
        if state.epoch != base.epoch or state.version - base.version != len(state.steps):
            return None
        try:
            ctx = self.l2.decode_state(state.payload, state.checksum, [], key=state.context_id, known=base)
        except ContextCorruption as exc:  # (DetachedNotHeld: it changed a large value base lacks)
            if not isinstance(exc, DetachedNotHeld):
                log_error(log, exc, "reading it instead")
            return None
        if ctx.version != state.version or ctx.epoch != state.epoch:
            return None
        ctx.continues(base, state.steps)
        return ctx

    def commit(self, ctx: RunContext, *, expected_version: int) -> RunContext:
        """Commit a changed context as version ``expected_version + 1`` (not a step's: an edit).

        The store takes ownership of ``ctx``: do not change it afterwards. Raises VersionConflict
        when someone else committed first; the caller merges and retries.
        """
        ctx.version = expected_version + 1
        outcome = self.try_commit(CommitRequest(ctx, expected_version))
        if isinstance(outcome, Refused) and outcome.actual_version is None:
            # The L2 entry expired: refill it from L3, where the version the caller started from must be.
            stored = self.l3.get_context(ctx.context_id)
            if stored is None or stored.version != expected_version:
                metrics().l2_conflicts.inc()
                raise VersionConflict("L2", f"context {ctx.context_id}", expected_version, stored.version if stored else None)
            self.l2.fill_context(stored)
            outcome = self.try_commit(CommitRequest(ctx, expected_version))
        if not isinstance(outcome, Committed):
            actual = outcome.actual_version if isinstance(outcome, Refused) else None
            raise VersionConflict("L2", f"context {ctx.context_id}", expected_version, actual)
        return outcome.context

    @contextlib.contextmanager
    def edit(self, context_id: str, *, at_least: int = 0) -> Iterator[RunContext]:
        """A private copy to change; committed as one compare-and-set when the block ends without error."""
        base = self.get_context(context_id, at_least=at_least)
        working = base.working_copy()
        yield working
        self.commit(working, expected_version=base.version)

    def travelling(self, ctx: RunContext, step_id: str, encoded: tuple[bytes, str]) -> CommittedState | None:
        """The state a step's message may carry: a small context without confidential or secret values."""
        payload, payload_checksum = encoded
        if ctx.holds_sensitive or len(payload) > self.config.l1_update_max_bytes:
            return None
        return CommittedState(ctx.context_id, ctx.version, ctx.epoch, ctx.last_steps() or (step_id,), payload, payload_checksum)

    @property
    def carries_outbox(self) -> bool:
        """Whether a step's commit can push its successor's message (see `state.tiers.data.Outbox`)."""
        return self.l2.carries_outbox

    def outbox_route(self, client: Any) -> OutboxRoute | None:
        """Whether a step's commit can push its successor onto queues of the Redis ``client`` talks to,
        and in which database (`RedisConnection.outbox_route`); None: it cannot."""
        where = getattr(self.l2, "outbox_route", None)
        return where(client) if self.carries_outbox and where is not None else None

    def encode(self, ctx: RunContext) -> tuple[bytes, str]:
        """The payload and checksum a commit of ``ctx`` stores (made once, for a commit and a message)."""
        self.blobs.claim_check(ctx, ctx.touched())
        return self.l2.encode_state(ctx)

    def evict_context(self, context_id: str, *, up_to_version: int | None = None) -> None:
        self.l2.evict_context(context_id, up_to_version)
        self.l1.evict_context(context_id, up_to_version)

    # ---- write-behind L2 -> L3 ----------------------------------------------------------------

    def flush(self, context_id: str) -> bool:
        """Write the L2 version of a context to L3 if it is newer there; returns whether L3 changed."""
        return self.write_behind.flush([context_id]) > 0

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew a named lease of the cluster for ``holder``; whether it holds it."""
        return self.l2.hold_lease(name, holder, ttl_s)

    def claim_due(self, *, lease_s: float, limit: int = 50, now: float | None = None) -> list[str]:
        """Contexts whose write-behind is due, each claimed for ``lease_s`` (unsent, it comes due again)."""
        return self.l2.claim_due(self.clock() if now is None else now, lease_s=lease_s, limit=limit)

    def pending_flushes(self) -> tuple[int, float | None]:
        """How many contexts wait for their L3 write, and when the oldest change among them was made."""
        return self.l2.pending_flushes(), self.l2.oldest_unwritten()
