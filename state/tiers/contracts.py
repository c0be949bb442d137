"""What each tier promises, as Protocols, one per concern; the services of `state/` are typed on
these, never on a concrete tier. The data they exchange is in `data`.

    L1Tier      one process's LRU: no I/O, thread-safe, never serves a version older than asked for
    L2 (Redis, or the in-memory twin), shared by every process:
      L2Contexts    versioned, checksummed contexts; compare-and-set commits that schedule the
                    debounced write-behind to L3
      L2Configs     routine definitions and configurations, cached with a TTL
      L2RunRecords  reports about a run: attempts, step outcomes, the failed flag, progress, done
      L2Bus         the control bus every process listens to (its messages: `state.bus`)
      L2Leases      named leases (one process of the cluster does a job), the heartbeat counter
    L3 (PostgreSQL, or the in-memory twin), the authoritative record, each operation one transaction:
      L3Contexts    context snapshots, written only if newer
      L3Ledger      the runs: created with their root context, finished with their final
                    contexts and exports, rewound, pruned
      L3Waits       steps waiting for outside events, and the signals sent to runs
      L3Blobs       values stored once by reference, and the runs that hold each
      L3Configs     routine definitions (versioned by content) and configurations
      L3Keys        the encryption keys values are sealed under

Each tier has a real implementation and an in-memory twin; `tests/state/test_tier_contracts.py`
runs one suite against both, so a twin cannot drift from the Lua and SQL it stands in for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from state.history import HistoryEntry
from state.models import RunContext
from state.tiers.data import (
    CommitReply,
    CommitRequest,
    CommittedState,
    ConfigEntry,
    ExportRecord,
    NewBlob,
    RunRow,
    SignalReceipt,
    StepStart,
    StoredContext,
    WaitRow,
)


@runtime_checkable
class L1Tier(Protocol):
    def get_context(self, context_id: str, at_least: int = 0, epoch: int | None = None) -> RunContext | None: ...
    def put_context(self, ctx: RunContext) -> None: ...
    def evict_context(self, context_id: str, up_to_version: int | None = None) -> bool: ...
    def context_version(self, context_id: str) -> int | None: ...
    def follow(self, state: CommittedState, decode: Callable[[bytes, str, RunContext], RunContext]) -> bool:
        """Move the cached copy forward to another process's commit (decoded when read)."""

    def note_run_ended(self, run_id: str) -> None: ...
    def forget_run_ended(self, run_id: str) -> None: ...
    def run_ended(self, run_id: str) -> bool:
        """Whether this process knows the run failed (a hint: L2's flag is the truth)."""

    def get_config(self, key: str) -> ConfigEntry | None: ...
    def put_config(self, entry: ConfigEntry) -> None: ...
    def evict_config(self, key: str) -> bool: ...
    def clear(self) -> None: ...


# ---- L2 ---------------------------------------------------------------------------------------------


@runtime_checkable
class L2Contexts(Protocol):
    def get_context(self, context_id: str) -> StoredContext | None:
        """The entry, checked against its checksum; raises ContextCorruption if it fails (KeyNotHeld if
        it was signed under a key this process does not hold)."""

    def commit(self, request: CommitRequest, *, now: float) -> CommitReply:
        """Compare-and-set ``request.context`` over ``request.expected_version`` and schedule its L3
        write (debounced). A step's commit adds its step to the applied steps, unless there already
        (ALREADY_APPLIED) or its run failed (RUN_FAILED), and writes its report and outbox message in
        the same atomic step; a commit that pushes a message is not broadcast (what follows it
        carries the state, or reads it). Its ``history`` entry joins the context's history list and
        is announced on the watch channel. Raises LineageLost when the entry is damaged."""

    def encode_state(self, ctx: RunContext) -> tuple[bytes, str]:
        """The payload a commit of ``ctx`` stores (applied steps aside) and its checksum."""

    def decode_state(
        self, payload: bytes, payload_checksum: str, applied: list[str], *, key: str, known: RunContext | None = None
    ) -> RunContext:
        """A context from a payload as this tier stores it (a `CommittedState` carries one), its
        detached values taken from ``known`` (a version before it); raises ContextCorruption if it
        does not match its checksum or does not describe a context, DetachedNotHeld if ``known``
        lacks a detached value it names (the context is then read)."""

    @property
    def carries_outbox(self) -> bool:
        """Whether a step's commit can push an `Outbox` message in the same atomic step."""

    def fill_contexts(self, contexts: list[RunContext], *, live: bool = False) -> int:
        """`fill_context` for each (pipelined where the server allows); how many were written."""

    def fill_context(self, ctx: RunContext, *, live: bool = False) -> bool:
        """Store ``ctx`` at its epoch and version: a reader's copy from L3 (with the context TTL), or
        (``live``) the start of a lineage, without TTL. Never replaces a newer epoch, or the same
        epoch at that version or a newer one."""

    def mark_flushed(
        self, context_id: str, version: int, *, now: float, epoch: int = 1, expire: bool = True, history_taken: str = ""
    ) -> bool:
        """L3 holds (``epoch``, ``version``) and the history entries up to ``history_taken`` (the last
        one it took, as the list holds it): those leave the list, what came after stays; unschedule the write (or reschedule it if newer changes came); with
        ``expire``, a clean entry gets the context TTL (a running run's contexts keep none)."""

    def history_lists(self, context_ids: list[str]) -> dict[str, list[str]]:
        """Each context's history entries (JSON) not yet in L3, oldest first: those commits pushed
        (`CommitRequest.history`) and events."""

    def push_history(self, context_id: str, entry: str, watch: str) -> None:
        """Add an entry to a context's history list; ``watch`` is announced on the watch channel."""

    def evict_context(self, context_id: str, up_to_version: int | None = None) -> bool: ...
    def context_ids(self) -> list[str]:
        """Every context L2 holds (a scan: for maintenance, never on a step's path)."""

    # the write-behind schedule
    def due_time(self, context_id: str) -> float | None: ...
    def claim_due(self, now: float, *, lease_s: float, limit: int = 100) -> list[str]: ...
    def pending_flushes(self) -> int: ...
    def next_due(self) -> float | None: ...
    def oldest_unwritten(self) -> float | None:
        """When the oldest change not yet in L3 was committed (None: nothing pending)."""


@runtime_checkable
class L2Configs(Protocol):
    def get_config(self, key: str) -> ConfigEntry | None: ...
    def put_config(self, entry: ConfigEntry) -> None: ...
    def evict_config(self, key: str) -> bool: ...
    def config_keys(self) -> list[str]:
        """Every routine definition and configuration L2 holds (a scan)."""


@runtime_checkable
class L2RunRecords(Protocol):
    def start_step(self, run_id: str, task_id: str, step_id: str) -> StepStart:
        """Count a start of a task message that is not its first (a redelivery, a retry): a first
        delivery is never counted (it costs no round trip), so the attempt returned is count + 1."""

    def run_failed(self, run_id: str) -> bool: ...
    def start_fan_out(self, run_id: str, fan_out: str, total: int, ended: dict[int, bool] | None = None) -> int:
        """Record a fan-out of ``total`` items (kept if recorded already), or, with ``ended`` (item ->
        failed), set it to what a rebuilt run's contexts show; returns how many items ended."""

    def end_item(self, run_id: str, fan_out: str, item: int, failed: bool) -> tuple[int, int, int]:
        """Count an item's end once: (its rank, 1 for the first to end; the total; how many failed).
        Rank 0: the fan-out's record is lost."""

    def finish_step(
        self, run_id: str, step_id: str, *, status: str = "failed", worker: str = "?", duration_s: float = 0.0,
        traceback: str | None = None, record: dict[str, Any] | None = None,
    ) -> None:
        """Record a step's outcome (``traceback``: a failed user action's own frames; ``record``: the
        record as a step's commit would have written it)."""

    def keep_hidden_error(self, run_id: str, sealed: dict[str, str]) -> None:
        """Keep the (sealed) real error of the step that failed the run; run_summary gives it back."""

    def mark_failed(self, run_id: str, error: str) -> bool:
        """Flag the run failed; True for the first flag, which is also announced on the bus."""

    def failure_of(self, run_id: str) -> str | None:
        """The error the run was failed with, if it was."""

    def forget_run(self, run_id: str) -> None:
        """Drop every record of a run (steps, progress, failed flag, counters): it was pruned."""

    def reopen_records(self, run_id: str) -> None:
        """A failed or cancelled run goes on (resumed): drop its failed flag, hidden error and done
        signal (its step records stay), and announce it on the bus."""

    def count_l3_write(self, run_id: str, count: int = 1) -> None: ...
    def run_summary(self, run_id: str) -> dict[str, Any]: ...
    def announce_done(self, run_id: str) -> None: ...
    def wait_done(self, run_id: str, timeout_s: float) -> bool: ...
    def touch_progress(self, run_ids: list[str], now: float) -> None:
        """Record that these runs moved (a step finished, or a running one is alive) at ``now``."""

    def progress_of(self, run_ids: list[str]) -> dict[str, float | None]:
        """When each run last moved, as far as L2 knows (None: no record)."""


@runtime_checkable
class L2Bus(Protocol):
    def publish(self, message: Any) -> int:
        """Send a `state.bus` message to every subscribed process; how many received it."""

    def announce_routine(self, routine: str, version: int) -> None:
        """Tell every process that ``routine`` at ``version`` is stored (or a run of it starts), so
        that each may compile its plan before a step of it arrives (a hint; nothing depends on it)."""


@runtime_checkable
class L2Leases(Protocol):
    """Named leases (one process does a job), and the heartbeat counter that tells L2 went back."""

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew a named lease for ``holder``; whether the holder has it."""

    def count_heartbeat(self) -> int: ...  # one more on the counter: the count goes back only if L2 did
    def note_loss(self, at: float, ttl_s: float) -> None: ...  # for ttl_s; the first note stays
    def loss_noted(self) -> float | None: ...
    def claim_loss_resume(self, run_id: str, ttl_s: float) -> bool:
        """Whether this caller is the first, within ``ttl_s``, to resume ``run_id`` for the noted loss."""


@runtime_checkable
class L2Tier(L2Contexts, L2Configs, L2RunRecords, L2Bus, L2Leases, Protocol):
    def ping(self) -> bool: ...
    def close(self) -> None: ...


# ---- L3 ---------------------------------------------------------------------------------------------


@runtime_checkable
class L3Contexts(Protocol):
    def get_context(self, context_id: str) -> RunContext | None: ...
    def context_version(self, context_id: str) -> int | None: ...

    def create_context(self, ctx: RunContext) -> None:
        """Insert a new context, and its creation's history entry; VersionConflict if the id exists.
        (Every create does the same: a context's history starts with what it was created with.)"""

    def write_context(self, ctx: RunContext) -> bool:
        """The write-behind: store ``ctx`` only if it is newer than what L3 holds; whether it did."""

    def create_contexts(self, contexts: list[RunContext]) -> int:
        """Insert new contexts in one transaction, leaving those that exist; how many were new."""

    def write_contexts(self, contexts: list[RunContext], history: Sequence[str] = ()) -> int:
        """`write_context` for each, with the ``history`` entries (as JSON, as the L2 lists hold them),
        in one transaction; how many contexts were written."""

    def run_contexts(self, run_id: str) -> list[RunContext]:
        """Every stored context of a run (with the steps each holds)."""

    def discard_context(self, context_id: str) -> None:
        """Forget a context (a child of a lineage a rewind gave up)."""


@runtime_checkable
class L3History(Protocol):
    def add_history(self, entries: Sequence[HistoryEntry]) -> None:
        """Store entries in one transaction; an entry already stored (the same id) is left as it is."""

    def run_history(self, run_id: str, *, after: int = 0, known: frozenset[str] = frozenset()) -> tuple[list[HistoryEntry], int]:
        """A run's entries stored after the mark ``after`` (0: all) but those in ``known``, in the
        order they were stored, and the newest mark seen. Entries never change once stored, so a
        reader keeps them; marks are handed out before commit, so an entry may appear after a later
        mark was seen: a reader asks again from a mark some time old, with the ids it holds."""

    def history_count(self, run_id: str) -> int: ...


@runtime_checkable
class L3Ledger(Protocol):
    def create_run(self, run: RunRow, root: RunContext) -> None:
        """The run and its root context, in one transaction (VersionConflict if the root exists;
        RunExists, with nothing written, if another run holds its ``idempotency_key``)."""

    def run_by_key(self, key: str) -> RunRow | None:
        """The run that holds an idempotency key, if one does."""

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
        history: Sequence[str] = (),
    ) -> bool:
        """Final contexts, exports, status and ``history``'s entries in one transaction (``meta``'s keys
        are added to what the run was created with); False (nothing written) if already
        final, or (with ``epoch``) if the run has been rewound past that epoch."""

    def get_run(self, run_id: str) -> RunRow | None: ...

    def list_runs(self, *, status: str | None = None, routine: str | None = None, limit: int = 50) -> list[RunRow]:
        """Runs, newest first, optionally of one status and one routine; a row's meta may hold
        ``step_count`` in place of its ``steps`` records."""

    def running_runs(self, limit: int = 1000) -> list[RunRow]:
        """Runs that are not finished, oldest change first."""

    def reopen_run(self, run_id: str) -> RunRow | None:
        """A failed or cancelled run is running again (resumed): its row as it is now, or None if it
        was not failed or cancelled (nothing changed). Its waits that no signal resolved are
        forgotten (armed again, with a new deadline, when the run reaches them)."""

    def begin_rewind(self, run_id: str, from_epoch: int) -> int | None:
        """Raise a running run's epoch from ``from_epoch``; the new epoch, or None if the run is
        finished or already past that epoch (someone else rewound it)."""

    def prune_runs(self, older_than_s: float, *, limit: int = 500) -> dict[str, list[str]]:
        """Delete up to ``limit`` finished runs that finished more than ``older_than_s`` ago, with
        their context snapshots, history, waits, signals and the blobs no kept run holds, in one transaction; exports and blackboard entries stay. Returns run
        id -> the ids of its contexts that were deleted. A run being pruned by another caller is
        skipped, never waited for."""


@runtime_checkable
class L3Waits(Protocol):
    def arm_wait(self, wait: WaitRow, timeout_s: float | None) -> WaitRow:
        """Record that a step waits for an event (kept as first armed: arming again changes nothing,
        the deadline counts from the first), consuming the signal kept for it if there is one; the
        wait as it is now. InvalidValue if another step of the run waits for that event."""

    def send_signal(self, run_id: str, event: str, payload: Any, sensitivity: str) -> SignalReceipt:
        """Store a signal (``payload`` as it is to be stored: sealed when sensitive) and resolve the
        open wait for it, if a step waits. NotFound for an unknown run, RunEnded for a finished one,
        SignalRefused (nothing stored) if the run was sent the event already or stopped waiting for it."""

    def wait_of(self, run_id: str, step_id: str) -> WaitRow | None:
        """A step's wait, with the payload of the signal that resolved it."""

    def open_waits(self, run_ids: list[str]) -> list[WaitRow]:
        """The waits of these runs that are not resolved yet."""

    def expire_waits(self, *, limit: int = 100) -> list[WaitRow]:
        """Resolve as timed out up to ``limit`` open waits of running runs whose deadline passed (by
        the database's clock), each once whoever else asks; the waits resolved."""


@runtime_checkable
class L3Blobs(Protocol):
    def put_blobs(self, run_id: str, blobs: Sequence[NewBlob]) -> int:
        """Store blobs (each once: an id stored already keeps its data) held by ``run_id``, in one
        transaction; how many were new. A blob's ``size`` is its data's, or where it is kept
        elsewhere (``data`` empty: an object store's index) the size of what is kept there."""

    def get_blob(self, blob_id: str) -> bytes | None: ...

    def hold_blobs(self, run_id: str, blob_ids: Iterable[str]) -> None:
        """``run_id`` holds these blobs too (a fork's contexts hold its origin's)."""

    def known_blobs(self, blob_ids: Iterable[str]) -> set[str]:
        """Which of these blobs are stored (the others: left by a prune, or by an upload never indexed)."""

    def blob_usage(self) -> tuple[int, int]:
        """How many blobs are stored, and their bytes."""


@runtime_checkable
class ObjectStore(Protocol):
    """Where blobs are kept when not in L3 (RUNCTX_BLOB_URL: an S3-compatible store); L3 indexes them."""

    def put_object(self, key: str, data: bytes, *, replace: bool = False) -> None:
        """Store ``data`` under ``key`` (content-addressed: a key stored already is left as it is,
        unless ``replace``: the same value sealed anew)."""

    def get_object(self, key: str) -> bytes | None: ...

    def delete_objects(self, keys: list[str]) -> None: ...

    def object_keys(self, *, older_than_s: float) -> list[str]:
        """The keys stored longer ago than ``older_than_s``."""


@runtime_checkable
class L3Configs(Protocol):
    def get_config(self, kind: str, name: str) -> ConfigEntry | None: ...
    def put_config(self, kind: str, name: str, data: Any, *, expected_version: int | None = None) -> int: ...
    def get_routine(self, name: str, version: int | None = None) -> ConfigEntry | None: ...
    def put_routine(self, name: str, definition: Any) -> int: ...


@runtime_checkable
class L3Keys(Protocol):
    def reseal(self, old_key_ids: set[str], *, limit: int = 100) -> int:
        """Seal again under the newest key up to ``limit`` contexts and exports sealed under
        ``old_key_ids`` (versions unchanged); how many were (0: none is left)."""

    def forget_keys(self, key_ids: set[str]) -> None:
        """Nothing is sealed under these any more: a process without them may start."""

    def record_key(self, key_id: str) -> None:
        """Record that values are (or will be) sealed under ``key_id``."""

    def key_ids(self) -> set[str]:
        """The ids of every key values were sealed under."""


@runtime_checkable
class L3Tier(L3Contexts, L3History, L3Ledger, L3Waits, L3Blobs, L3Configs, L3Keys, Protocol):
    def ping(self) -> bool: ...
    def close(self) -> None: ...
