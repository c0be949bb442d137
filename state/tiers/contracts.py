"""What each tier promises, as Protocols; `TieredStore` is typed on these, never on a concrete tier.

    L1Tier   one process's LRU: no I/O, thread-safe, never serves a version older than asked for
    L2Tier   shared by every process (Redis, or the in-memory twin): versioned, checksummed entries,
             compare-and-set commits that schedule the debounced write-behind, run records
    L3Tier   the authoritative record (PostgreSQL, or the in-memory twin): context snapshots with
             optimistic locking, routine definitions, configurations and the run ledger, each
             operation one transaction

Each tier has a real implementation and an in-memory twin; `tests/test_tier_contracts.py` runs one
suite against both, so a twin cannot drift from the Lua and SQL it stands in for.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from state.models import RunContext


@dataclass(frozen=True)
class ConfigEntry:
    """A cached routine definition or configuration document with its L3 version."""

    key: str
    version: int
    data: Any


@dataclass(frozen=True)
class StoredContext:
    """A context as read from L2: whether it holds changes not yet written to L3, and whether it is
    a live lineage (created, committed to or rebuilt by a rewind) or a reader's copy filled from L3."""

    context: RunContext
    version: int
    dirty: bool
    live: bool = True

    @property
    def epoch(self) -> int:
        return self.context.epoch


class CommitResult(enum.Enum):
    """What a compare-and-set commit did; true only for COMMITTED."""

    COMMITTED = 1
    NO_ENTRY = -1  # no entry though a version was expected (the caller refills it from L3)
    ALREADY_APPLIED = 2  # a step's commit: the context holds that step already (a duplicate)
    RUN_FAILED = 3  # a step's commit: its run failed meanwhile; nothing was written

    def __bool__(self) -> bool:
        return self is CommitResult.COMMITTED


@dataclass(frozen=True)
class Outbox:
    """A broker message that rides in a step's commit (a transactional outbox): pushed onto the list
    ``queue`` in the same atomic step as the commit, or not at all. What follows a step is then
    sent exactly when the step commits, in the commit's one round trip."""

    queue: str  # the key of the broker's queue (a Redis list on the server that holds L2)
    message: bytes  # the message as the broker's transport stores it


@dataclass(frozen=True)
class CommittedState:
    """A context as a step's commit stored it in L2: its payload under its checksum (a keyed MAC).

    The message of the step that follows carries it (`TieredStore.commit_step`), so the process that
    runs that step finds ``version`` in its L1 without a read; a commit broadcast may carry one too.
    Only a context without confidential or secret values travels so, of at most
    ``StateCacheConfig.l1_update_max_bytes``. Whoever receives one checks the checksum before use."""

    context_id: str
    version: int
    epoch: int
    # The ids of the steps whose commits made the last versions, oldest first, the last one's made
    # ``version``: a process holding a version before them follows to this one without a read.
    steps: tuple[str, ...]
    payload: bytes
    checksum: str


@dataclass(frozen=True)
class StepStart:
    attempt: int  # how many times this task message has started (more than 1: redelivered or retried)
    run_failed: bool


@dataclass(frozen=True)
class StepReport:
    """What a step's commit records about the step, in the same atomic write (its run's step record)."""

    run_id: str
    step_id: str
    worker: str
    duration_s: float
    attempts: int = 1

    def record(self, finished_at: float) -> dict[str, Any]:
        return {
            "status": "succeeded", "worker": self.worker, "duration_s": round(self.duration_s, 6),
            "finished_at": finished_at, "attempts": self.attempts,
        }


@dataclass(frozen=True)
class RunRow:
    """A run as the ledger (L3) holds it."""

    run_id: str
    routine_name: str
    routine_version: int | None
    root_context_id: str
    status: str  # running | succeeded | failed
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    epoch: int = 1  # raised by every rewind: messages of an older epoch are refused
    updated_at: dt.datetime | None = None


@dataclass(frozen=True)
class ExportRecord:
    """One value a finished run exports: to a blackboard scope (replacing) or kept per run."""

    destination: str  # blackboard | persistent
    run_id: str
    variable: str
    key: str
    scope: str
    value: Any
    sensitivity: str


FINAL_STATUSES = ("succeeded", "failed", "cancelled")
CANCELLED = "cancelled by request"  # the failed flag's text of a cancelled run: it finalizes as cancelled


@runtime_checkable
class L1Tier(Protocol):
    def get_context(self, context_id: str, at_least: int = 0, epoch: int | None = None) -> RunContext | None: ...
    def put_context(self, ctx: RunContext) -> None: ...
    def evict_context(self, context_id: str, up_to_version: int | None = None) -> bool: ...
    def context_version(self, context_id: str) -> int | None: ...
    def follow(self, state: CommittedState, decode: Callable[[bytes, str], RunContext]) -> bool:
        """Move the cached copy forward to another process's commit (decoded when read)."""

    def note_run_ended(self, run_id: str) -> None: ...
    def run_ended(self, run_id: str) -> bool:
        """Whether this process knows the run failed (a hint: L2's flag is the truth)."""

    def get_config(self, key: str) -> ConfigEntry | None: ...
    def put_config(self, entry: ConfigEntry) -> None: ...
    def evict_config(self, key: str) -> bool: ...
    def clear(self) -> None: ...


@runtime_checkable
class L2Tier(Protocol):
    # contexts
    def get_context(self, context_id: str) -> StoredContext | None:
        """The entry, checked against its checksum; raises ContextCorruption if it fails."""

    def commit_context(
        self,
        ctx: RunContext,
        *,
        expected_version: int,
        now: float,
        debounce_s: float,
        max_delay_s: float,
        expected_epoch: int | None = None,
        require_live: bool = False,
        step_id: str | None = None,
        report: StepReport | None = None,
        outbox: Outbox | None = None,
        encoded: tuple[bytes, str] | None = None,
    ) -> CommitResult:
        """CAS ``ctx`` (carrying its new version and epoch) over ``expected_version`` and schedule its L3 write.

        A step's commit (``step_id``) adds the step to the context's applied steps, unless it is
        there already (ALREADY_APPLIED, nothing written) or the run failed (RUN_FAILED); with
        ``report`` (a step's commit, ``step_id`` defaulting to its step's), it records the step (and
        its run's progress) in the same write. NO_ENTRY: no
        entry though a version was expected. Raises VersionConflict on a stale write, and
        LineageLost when the entry is of another epoch than ``expected_epoch``, (with
        ``require_live``) a reader's copy rather than a live lineage, or damaged. ``outbox`` (only
        with ``report``, only where ``carries_outbox``) is pushed if, and only if, it COMMITTED; a
        commit that pushes one is not broadcast (what follows it carries the state, or reads it).
        ``encoded``: ``encode_state(ctx)``, when the caller needed the payload already.
        """

    def encode_state(self, ctx: RunContext) -> tuple[bytes, str]:
        """The payload a commit of ``ctx`` stores (applied steps aside) and its checksum."""

    @property
    def carries_outbox(self) -> bool:
        """Whether a step's commit can push an `Outbox` message in the same atomic step."""

    def decode_state(self, payload: bytes, payload_checksum: str, applied: list[str], *, key: str) -> RunContext:
        """A context from a payload as this tier stores it (a `CommittedState` carries one); raises
        ContextCorruption if it does not match its checksum or does not describe a context."""

    def fill_context(self, ctx: RunContext, *, live: bool = False) -> bool:
        """Store ``ctx`` at its epoch and version: a reader's copy from L3 (with the context TTL), or
        (``live``) the start of a lineage, without TTL. Never replaces a newer epoch, or the same
        epoch at that version or a newer one."""

    def mark_flushed(
        self, context_id: str, version: int, *, now: float, debounce_s: float, epoch: int = 1, expire: bool = True
    ) -> bool:
        """L3 holds (``epoch``, ``version``): unschedule the write (or reschedule it if newer changes
        came); with ``expire``, a clean entry gets the context TTL (a running run's contexts keep none)."""

    def evict_context(self, context_id: str, up_to_version: int | None = None) -> bool: ...
    def context_ids(self) -> list[str]:
        """Every context L2 holds (a scan: for maintenance, never on a step's path)."""

    def config_keys(self) -> list[str]:
        """Every routine definition and configuration L2 holds (a scan)."""

    def due_time(self, context_id: str) -> float | None: ...
    def claim_due(self, now: float, *, lease_s: float, limit: int = 100) -> list[str]: ...
    def pending_flushes(self) -> int: ...
    def next_due(self) -> float | None: ...
    def oldest_unwritten(self) -> float | None:
        """When the oldest change not yet in L3 was committed (None: nothing pending)."""
        ...

    # routine definitions and configurations
    def get_config(self, key: str) -> ConfigEntry | None: ...
    def put_config(self, entry: ConfigEntry) -> None: ...
    def evict_config(self, key: str) -> bool: ...

    # run records: reports about a run (attempts, step outcomes, failure flag, completion)
    def start_step(self, run_id: str, task_id: str, step_id: str) -> StepStart:
        """Count a start of a task message that is not its first (a redelivery, a retry): a first
        delivery is never counted (it costs no round trip), so the attempt returned is count + 1."""

    def run_failed(self, run_id: str) -> bool: ...
    def finish_step(
        self, run_id: str, step_id: str, *, status: str = "failed", worker: str = "?", duration_s: float = 0.0,
        traceback: str | None = None, record: dict[str, Any] | None = None,
    ) -> None:
        """Record a step's outcome (``traceback``: a failed user action's own frames; ``record``: the
        record as a step's commit would have written it)."""

    def keep_hidden_error(self, run_id: str, sealed: dict[str, str]) -> None:
        """Keep the (sealed) real error of the step that failed the run; run_summary gives it back."""

    def forget_run(self, run_id: str) -> None:
        """Drop every record of a run (steps, progress, failed flag, counters): it was pruned."""

    def announce_routine(self, routine: str, version: int) -> None:
        """Tell every process that ``routine`` at ``version`` is stored (or a run of it starts), so
        that each may compile its plan before a step of it arrives (a hint; nothing depends on it)."""

    def mark_failed(self, run_id: str, error: str) -> bool:
        """Flag the run failed; True for the first flag, which is also broadcast to every process."""

    def failure_of(self, run_id: str) -> str | None:
        """The error the run was failed with, if it was."""

    def count_l3_write(self, run_id: str, count: int = 1) -> None: ...
    def run_summary(self, run_id: str) -> dict[str, Any]: ...
    def announce_done(self, run_id: str) -> None: ...
    def wait_done(self, run_id: str, timeout_s: float) -> bool: ...
    def touch_progress(self, run_ids: list[str], now: float) -> None:
        """Record that these runs moved (a step finished, or a running one is alive) at ``now``."""

    def progress_of(self, run_ids: list[str]) -> dict[str, float | None]:
        """When each run last moved, as far as L2 knows (None: no record)."""

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew a named lease for ``holder``; whether the holder has it."""

    def ping(self) -> bool: ...
    def close(self) -> None: ...


@runtime_checkable
class L3Tier(Protocol):
    # contexts
    def get_context(self, context_id: str) -> RunContext | None: ...
    def context_version(self, context_id: str) -> int | None: ...

    def create_context(self, ctx: RunContext) -> None:
        """Insert a new context; VersionConflict if the id exists."""

    def write_context(self, ctx: RunContext) -> bool:
        """The write-behind: store ``ctx`` only if it is newer than what L3 holds; whether it did."""

    # the run ledger
    def create_run(self, run: RunRow, root: RunContext) -> None:
        """The run and its root context, in one transaction (VersionConflict if the root exists)."""

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
        """Final contexts, exports and status in one transaction; False (nothing written) if already
        final, or (with ``epoch``) if the run has been rewound past that epoch."""

    def get_run(self, run_id: str) -> RunRow | None: ...

    def list_runs(self, *, status: str | None = None, routine: str | None = None, limit: int = 50) -> list[RunRow]:
        """Runs, newest first, optionally of one status and one routine."""

    def running_runs(self, limit: int = 1000) -> list[RunRow]:
        """Runs that are not finished, oldest change first."""

    # rewinding a run whose L2 state was lost
    def begin_rewind(self, run_id: str, from_epoch: int) -> int | None:
        """Raise a running run's epoch from ``from_epoch``; the new epoch, or None if the run is
        finished or already past that epoch (someone else rewound it)."""

    def run_contexts(self, run_id: str) -> list[RunContext]:
        """Every stored context of a run (with the steps each holds)."""

    # retention
    def prune_runs(self, older_than_s: float, *, limit: int = 500) -> dict[str, list[str]]:
        """Delete up to ``limit`` finished runs (succeeded, failed, cancelled) that finished more than
        ``older_than_s`` ago, with their context snapshots, in one transaction; exports and blackboard
        entries stay. Returns run id -> the ids of its contexts that were deleted. A run being
        pruned by another caller is skipped, never waited for."""

    def discard_context(self, context_id: str) -> None:
        """Forget a context (a child of a lineage a rewind gave up)."""

    # routine definitions and configurations
    def get_config(self, kind: str, name: str) -> ConfigEntry | None: ...
    def put_config(self, kind: str, name: str, data: Any, *, expected_version: int | None = None) -> int: ...
    def get_routine(self, name: str, version: int | None = None) -> ConfigEntry | None: ...
    def put_routine(self, name: str, definition: Any) -> int: ...

    # the keys in use
    def reseal(self, old_key_ids: set[str], *, limit: int = 100) -> int:
        """Seal again under the newest key up to ``limit`` contexts and exports sealed under
        ``old_key_ids`` (versions unchanged); how many were (0: none is left)."""

    def forget_keys(self, key_ids: set[str]) -> None:
        """Nothing is sealed under these any more: a process without them may start."""

    def record_key(self, key_id: str) -> None:
        """Record that values are (or will be) sealed under ``key_id``."""

    def key_ids(self) -> set[str]:
        """The ids of every key values were sealed under."""

    def ping(self) -> bool: ...
    def close(self) -> None: ...
