"""What the tiers hold and hand back: plain, frozen data (the Protocols are in `contracts`)."""

from __future__ import annotations

import datetime as dt
import enum
import json
from dataclasses import dataclass, field
from typing import Any

from state.models import RunContext

FINAL_STATUSES = ("succeeded", "failed", "cancelled")
RUN_STATUSES = ("running", *FINAL_STATUSES)
CANCELLED = "cancelled by request"  # the failed flag's text of a cancelled run: it finalizes as cancelled


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


@dataclass(frozen=True)
class Outbox:
    """A broker message that rides in a step's commit (a transactional outbox): pushed onto the list
    ``queue`` in the same atomic step as the commit, or not at all. What follows a step is then
    sent exactly when the step commits, in the commit's one round trip."""

    queue: str  # the key of the broker's queue (a Redis list on the server that holds L2)
    message: bytes  # the message as the broker's transport stores it
    database: int | None = None  # the broker's database on that server, when it is not L2's


@dataclass(frozen=True)
class OutboxRoute:
    """Where a commit's outbox can reach a broker's queues: on L2's server, in L2's database (None)
    or in another one (a commit's script selects it to push)."""

    database: int | None = None


@dataclass(frozen=True)
class CommittedState:
    """A context as a step's commit stored it in L2: its payload under its checksum (a keyed MAC).

    The message of the step that follows carries it, so the process that runs that step finds
    ``version`` in its L1 without a read; a commit broadcast may carry one too. Only a context
    without confidential or secret values travels so, of at most
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
class CommitRequest:
    """One compare-and-set of a context on L2, every field named (the tiers turn it into their
    script's arguments in one place each).

    ``context`` carries the new version and epoch; it replaces ``expected_version``. ``expected_epoch``
    (None: any) and ``require_live`` refuse an entry of another lineage. A step's commit names its
    ``step_id`` (it joins the context's applied steps, unless there already) and may carry its
    ``report`` (the step's record, written in the same step) and an ``outbox`` message (pushed if,
    and only if, it commits). ``encoded``: the payload and checksum, when the caller made them already.
    ``history``: the commit's history entry (`state.history`, as JSON), pushed onto the context's
    history list in the same atomic step and announced on the watch channel.
    """

    context: RunContext
    expected_version: int
    expected_epoch: int | None = None
    require_live: bool = False
    step_id: str | None = None
    report: StepReport | None = None
    outbox: Outbox | None = None
    encoded: tuple[bytes, str] | None = None
    history: str | None = None

    def __post_init__(self) -> None:
        if self.outbox is not None and self.report is None:
            raise ValueError("an outbox message rides only in a step's commit (with its report)")
        if self.report is not None and self.step_id is None:  # a step's record is a step's commit
            object.__setattr__(self, "step_id", self.report.step_id)


class CommitStatus(enum.Enum):
    COMMITTED = "committed"
    STALE = "stale"  # another writer committed first (``actual_version``; ``newer`` when told)
    OTHER_LINEAGE = "other lineage"  # the entry is of another epoch, or a reader's copy where a live one was needed
    NO_ENTRY = "no entry"  # nothing to compare with, though a version was expected
    ALREADY_APPLIED = "already applied"  # a step's commit: the context holds that step already
    RUN_FAILED = "run failed"  # a step's commit: its run failed (or was cancelled); nothing was written


@dataclass(frozen=True)
class CommitReply:
    """What L2 did with a `CommitRequest` (a damaged entry raises LineageLost instead)."""

    status: CommitStatus
    actual_version: int | None = None
    # With STALE, what beat the write, when the tier could tell it in the same reply: the state that
    # is there now and the steps of the commits since ``expected_version``.
    newer: CommittedState | None = None

    @property
    def committed(self) -> bool:
        return self.status is CommitStatus.COMMITTED


def watch_message(run_id: str, context_id: str, version: int = 0, step_id: str = "", status: str = "") -> str:
    """What the watch channel says of a change to a run: which run, context, version and step."""
    return json.dumps({"run": run_id, "context": context_id, "version": version, "step": step_id, "status": status})


@dataclass(frozen=True)
class StepStart:
    attempt: int  # how many times this task message has started (more than 1: redelivered or retried)
    run_failed: bool


@dataclass(frozen=True)
class RunRow:
    """A run as the ledger (L3) holds it."""

    run_id: str
    routine_name: str
    routine_version: int | None
    root_context_id: str
    status: str  # one of RUN_STATUSES
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    epoch: int = 1  # raised by every rewind: messages of an older epoch are refused
    updated_at: dt.datetime | None = None
    # A submit's idempotency key (unique among the runs kept) and a keyed digest of what it asked for.
    idempotency_key: str | None = None
    request_digest: str | None = None


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


@dataclass(frozen=True)
class WaitRow:
    """A step waiting for an outside event (`wait_for`), as L3 holds it. ``resolution`` is None while
    it waits, ``signal`` once a signal was matched to it (``payload``: the value as stored, sealed
    when ``sensitivity`` is confidential or secret) or ``timeout`` once its deadline passed."""

    run_id: str
    step_id: str  # concrete (a fan-out item's has its index)
    event: str
    node: int
    items: tuple[int, ...] = ()
    deadline: float | None = None  # epoch seconds, by the database's clock
    armed_at: float | None = None
    resolution: str | None = None
    payload: Any = None
    sensitivity: str = "public"
    early: bool = False  # its signal came before the step began to wait


@dataclass(frozen=True)
class SignalReceipt:
    """A signal stored: the wait it resolved at once (None: kept until a step waits for it)."""

    run_id: str
    event: str
    wait: WaitRow | None


@dataclass(frozen=True)
class NewBlob:
    """A blob to store: its address, its data (empty where an object store keeps it) and its size."""

    blob_id: str
    data: bytes
    size: int
