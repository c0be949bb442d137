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
    """A context as read from L2, with whether it holds changes not yet written to L3."""

    context: RunContext
    version: int
    dirty: bool


@dataclass(frozen=True)
class StepStart:
    attempt: int  # how many times this task message has started (more than 1: it was redelivered)
    run_failed: bool


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


FINAL_STATUSES = ("succeeded", "failed")


@runtime_checkable
class L1Tier(Protocol):
    def get_context(self, context_id: str, at_least: int = 0) -> RunContext | None: ...
    def put_context(self, ctx: RunContext) -> None: ...
    def evict_context(self, context_id: str, up_to_version: int | None = None) -> bool: ...
    def context_version(self, context_id: str) -> int | None: ...
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
        self, ctx: RunContext, *, expected_version: int, now: float, debounce_s: float, max_delay_s: float
    ) -> bool:
        """CAS ``ctx`` (carrying its new version) over ``expected_version`` and schedule its L3 write.

        False: no entry though a version was expected (the caller refills it from L3). Raises
        VersionConflict on a stale write.
        """

    def fill_context(self, ctx: RunContext) -> bool:
        """Store a clean copy read from L3, unless that version or a newer one is there."""

    def mark_flushed(self, context_id: str, version: int, *, now: float, debounce_s: float) -> bool:
        """L3 holds ``version``: unschedule the write (or reschedule it if newer changes came)."""

    def evict_context(self, context_id: str, up_to_version: int | None = None) -> bool: ...
    def due_time(self, context_id: str) -> float | None: ...
    def claim_due(self, now: float, *, lease_s: float, limit: int = 100) -> list[str]: ...
    def pending_flushes(self) -> int: ...
    def next_due(self) -> float | None: ...

    # routine definitions and configurations
    def get_config(self, key: str) -> ConfigEntry | None: ...
    def put_config(self, entry: ConfigEntry) -> None: ...
    def evict_config(self, key: str) -> bool: ...

    # run records: reports about a run (attempts, step outcomes, failure flag, completion)
    def start_step(self, run_id: str, task_id: str, step_id: str) -> StepStart: ...
    def finish_step(self, run_id: str, step_id: str, *, status: str, worker: str, duration_s: float) -> None: ...
    def mark_failed(self, run_id: str, error: str) -> bool: ...
    def count_l3_write(self, run_id: str, count: int = 1) -> None: ...
    def run_summary(self, run_id: str) -> dict[str, Any]: ...
    def announce_done(self, run_id: str) -> None: ...
    def wait_done(self, run_id: str, timeout_s: float) -> bool: ...

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
    ) -> bool:
        """Final contexts, exports and status in one transaction; False (nothing written) if already final."""

    def get_run(self, run_id: str) -> RunRow | None: ...

    # routine definitions and configurations
    def get_config(self, kind: str, name: str) -> ConfigEntry | None: ...
    def put_config(self, kind: str, name: str, data: Any, *, expected_version: int | None = None) -> int: ...
    def get_routine(self, name: str, version: int | None = None) -> ConfigEntry | None: ...
    def put_routine(self, name: str, definition: Any) -> int: ...

    def ping(self) -> bool: ...
    def close(self) -> None: ...
