"""Every error runctx raises, in one tree. Library errors (redis-py, SQLAlchemy, psycopg, Celery) are
mapped to these at the boundary where they happen; nothing above `state/` sees them.

    RunctxError                    code, severity, message; never carries a variable's value
    ├── InfrastructureError        a server or a transaction failed: the work is retried
    │   ├── CommunicationFailure       Redis or PostgreSQL could not be reached
    │   ├── TransactionFailed          an L3 transaction kept failing after its retries
    │   ├── VersionConflict            a compare-and-set lost to another writer (merged and retried)
    │   ├── ContextCorruption          a stored entry fails its checksum or shape (healed from L3)
    │   ├── LineageLost                the state a step needs is in no tier any more: the run is rewound
    │   ├── StaleEpoch                 a message or writer from before a rewind: refused, never applied
    │   ├── WorkersDidNotStart         local worker nodes did not come up
    │   ├── EmbeddedStackError         the embedded Redis/PostgreSQL did not start
    │   └── HealthCheckFailed          `runctx check` found a tier that does not do its job
    ├── RoutineError               the routine, its input or its data is wrong: the run fails, no retry
    │   ├── InvalidRoutine             a routine file that cannot run (file, path inside it, problem)
    │   ├── InvalidValue               a name or value runctx cannot store
    │   ├── LimitExceeded              a value or context over its ResourceLimits (variable, limit, size)
    │   ├── SensitivityViolation       an attempt to lower a variable's sensitivity
    │   ├── MergeConflict              variables that differ on both sides under the FAIL strategy
    │   ├── StepFailed                 a step's action failed (or was the `fail` action)
    │   ├── NodeMisconfigured          this node's settings do not let it run the step (setting named)
    │   │   └── KeyNotHeld                 a stored value sealed or signed under a key this process lacks
    │   └── RefusedByDatabase          PostgreSQL refused what it was asked to store, for good
    ├── RequestError               what a caller asked for cannot be given
    │   ├── NotFound                   no such run, context, routine or configuration
    │   ├── RunTimeout                 a run did not finish within the time a caller waited
    │   └── SettingsError              RUNCTX_* settings that cannot work together (the setting named)
    ├── RunFailed                  a step's commit found its run failed: nothing written, the step ends
    └── StepFailedItsRun           this step failed its run: its Celery task ends FAILURE with the reason

Which branch an error is on decides what happens to the work that raised it: Celery's autoretry
retries ``InfrastructureError`` (see ``workers.celery_tasks``), the engine fails the run on a
``RoutineError``, and anything else a step raises is a bug that fails its run too. ``severity``
decides the level an error is logged at (``log_error``).
"""

from __future__ import annotations

from typing import Any

import logging
from enum import Enum


class Severity(str, Enum):
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"

    @property
    def log_level(self) -> int:
        return {"warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}[self.value]


class RunctxError(Exception):
    """Base of every runctx error; ``code`` matches the design document's error names."""

    code: str = "RUNCTX_ERROR"
    severity: Severity = Severity.ERROR

    def __init__(self, message: str, *, severity: Severity | None = None) -> None:
        super().__init__(message)
        if severity is not None:
            self.severity = severity


def log_error(logger: logging.Logger, error: BaseException, context: str) -> None:
    """Log ``context: error`` at the level the error's severity asks for (unexpected errors: ERROR)."""
    if isinstance(error, RunctxError):
        logger.log(error.severity.log_level, "%s: %s [%s]", context, error, error.code)
    else:
        logger.error("%s: %s: %s", context, type(error).__name__, error)


# ---- infrastructure: retried ----------------------------------------------------------------------


class InfrastructureError(RunctxError):
    """A server or transaction failed; the same work may succeed when tried again."""

    code = "INFRASTRUCTURE"


class HandedBack(InfrastructureError):
    """This process cannot run a step that another may (it lacks a key the step's state was sealed
    under: it started before a key rotation): the step's task is tried again, by whichever node
    takes it, instead of failing the run."""

    code = "HANDED_BACK"


class CommunicationFailure(InfrastructureError):
    """A tier (Redis or PostgreSQL) could not be reached."""

    code = "COMMUNICATION_FAILURE"
    severity = Severity.CRITICAL

    def __init__(self, tier: str, cause: BaseException | str) -> None:
        self.tier, self.cause = tier, cause
        super().__init__(f"{tier} unreachable: {cause}")


class TransactionFailed(InfrastructureError):
    """An L3 transaction that still failed after its retries."""

    code = "TRANSACTION_FAILED"

    def __init__(self, operation: str, attempts: int, cause: BaseException) -> None:
        self.operation, self.attempts, self.cause = operation, attempts, cause
        super().__init__(f"{operation} failed after {attempts} attempt(s): {cause}")


class VersionConflict(InfrastructureError):
    """A compare-and-set was refused: someone else committed first. Resolve and retry."""

    code = "VERSION_CONFLICT"
    severity = Severity.WARNING

    def __init__(self, tier: str, key: str, expected: int | None, actual: int | None, newer: Any = None) -> None:
        self.tier, self.key, self.expected, self.actual = tier, key, expected, actual
        # What beat the write, when the tier could tell it in the same reply: the newer state and the
        # steps of the commits since ``expected`` (a `state.tiers.contracts.CommittedState`).
        self.newer = newer
        super().__init__(f"{tier}: stale write to {key}: expected version {expected}, found {actual}")


class ContextCorruption(InfrastructureError):
    """A stored entry whose checksum or shape is wrong; it is dropped and reloaded from L3."""

    code = "CONTEXT_CORRUPTION"
    severity = Severity.CRITICAL

    def __init__(self, key: str, detail: str) -> None:
        self.key, self.detail = key, detail
        super().__init__(f"corrupt entry {key}: {detail}")


class DetachedNotHeld(ContextCorruption):
    """A payload names a detached value (`state.detached`) that neither its fields nor the version
    before it hold here: the context is read from L2 instead (not damage)."""

    code = "DETACHED_NOT_HELD"
    severity = Severity.WARNING

    def __init__(self, key: str, field: str) -> None:
        super().__init__(key, f"its detached value {field} is not held here")


class LineageLost(InfrastructureError):
    """The version a step needs is in no tier any more (L2 lost or corrupt, or holding another lineage).

    The engine answers by rewinding the run to what L3 holds (a new epoch); it never leaves a task.
    """

    code = "LINEAGE_LOST"
    severity = Severity.WARNING

    def __init__(self, context_id: str, detail: str) -> None:
        self.context_id, self.detail = context_id, detail
        super().__init__(f"context {context_id}: {detail}")


class StaleEpoch(InfrastructureError):
    """A step message, finalize or writer from before a rewind: refused, never applied to the new lineage."""

    code = "STALE_EPOCH"
    severity = Severity.WARNING

    def __init__(self, context_id: str, epoch: int, current: int) -> None:
        self.context_id, self.epoch, self.current = context_id, epoch, current
        super().__init__(f"context {context_id}: epoch {epoch} is stale, the run is at epoch {current}")


class RunFailed(RunctxError):
    """A step's commit found its run failed (by another step) meanwhile: nothing was written.

    Not a failure of the step: the engine ends it quietly, and Celery does not retry it.
    """

    code = "RUN_FAILED"
    severity = Severity.WARNING

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id} failed; the step's changes were not written")


class StepFailedItsRun(RunctxError):
    """Raised by a step's task after its step failed the run (the run is failed and finalized already),
    so that Celery, Flower and ``celery events`` show the task as FAILURE with the reason.

    The reason is the run's error as stored: a step that read secret values has its text hidden.
    Celery neither retries it nor logs a traceback for it (the task declares it in ``throws``).
    """

    code = "STEP_FAILED_ITS_RUN"
    severity = Severity.WARNING

    def __init__(self, run_id: str, step_id: str, reason: str) -> None:
        self.run_id = run_id
        self.step_id = step_id
        self.reason = reason
        super().__init__(f"run {run_id} failed: {reason}")  # the reason names the step

    def __reduce__(self) -> tuple:
        # The prefork pool hands a task's exception to the node's main process as a copy, rebuilt
        # from these arguments (messages themselves are JSON only).
        return (type(self), (self.run_id, self.step_id, self.reason))


class WorkersDidNotStart(InfrastructureError):
    """Worker nodes started for a command did not become ready."""

    code = "WORKERS_DID_NOT_START"


class EmbeddedStackError(InfrastructureError):
    """The embedded stack could not be started (the message includes the server log tails)."""

    code = "EMBEDDED_STACK"
    severity = Severity.CRITICAL


class HealthCheckFailed(InfrastructureError):
    """A tier answered but did not do what the health check asked of it."""

    code = "HEALTH_CHECK_FAILED"


# ---- the routine: the run fails ---------------------------------------------------------------------


class RoutineError(RunctxError):
    """The routine, its input or its data is wrong; trying again would fail again."""

    code = "ROUTINE_ERROR"


class InvalidRoutine(RoutineError, ValueError):
    """A routine file that cannot run; the message names the file, the path inside it and the problem."""

    code = "INVALID_ROUTINE"


class InvalidValue(RoutineError, ValueError):
    """A variable name or value that runctx cannot store (not JSON, bad name, unknown scope...)."""

    code = "INVALID_VALUE"


class LimitExceeded(RoutineError, ValueError):
    """A value or context is larger than its ResourceLimits allow; nothing was changed."""

    code = "LIMIT_EXCEEDED"

    def __init__(self, variable: str, limit: str, size: int, maximum: int) -> None:
        self.variable, self.limit, self.size, self.maximum = variable, limit, size, maximum
        super().__init__(f"variable {variable!r}: {limit} is {maximum}, got {size}")


class SensitivityViolation(RoutineError, ValueError):
    """An attempt to lower the sensitivity of a variable (e.g. in a child context)."""

    code = "SENSITIVITY_VIOLATION"


class MergeConflict(RoutineError):
    """A merge under the FAIL strategy met variables that differ on both sides."""

    code = "MERGE_CONFLICT"

    def __init__(self, variables: list[str]) -> None:
        self.variables = variables
        super().__init__(f"conflicting variables under FAIL strategy: {', '.join(variables)}")


class StepFailed(RoutineError):
    """A step's action failed (or was the `fail` action): the run fails, the step is not retried.

    ``hidden``: the action's own error text when the step read confidential or secret values: it
    is never in the message, only stored sealed with the run. ``traceback``: a user action's
    traceback from its own first frame (sensitive values redacted; None when hidden), and
    ``cause`` an exception holding just those frames, for Celery to show.
    """

    code = "STEP_FAILED"
    # The names of the failed action's exception class and its bases (a retry policy's ``on``).
    error_types: tuple[str, ...] = ()

    def __init__(self, message: str, *, hidden: str | None = None, traceback: str | None = None) -> None:
        super().__init__(message)
        self.hidden = hidden
        self.traceback = traceback
        self.cause: BaseException | None = None


class NodeMisconfigured(RoutineError):
    """This node's settings do not let it run a step (an action module it may not or cannot import, a
    key it does not hold): the run fails, saying which setting of which node, instead of waiting for ever."""

    code = "NODE_MISCONFIGURED"

    def __init__(self, setting: str, problem: str) -> None:
        self.setting, self.problem = setting, problem
        super().__init__(problem if setting in problem else f"{setting}: {problem}")


class KeyNotHeld(NodeMisconfigured):
    """A stored value is sealed, or an entry signed, under a key this process does not hold: not damage
    but a configuration mismatch (RUNCTX_ENCRYPTION_KEYS differs between processes), so the entry is
    never dropped as corrupt: a process that holds the key reads it."""

    code = "KEY_NOT_HELD"
    severity = Severity.CRITICAL

    def __init__(self, where: str, key_id: str) -> None:
        self.where, self.key_id = where, key_id
        super().__init__(
            "RUNCTX_ENCRYPTION_KEYS",
            f"{where} was sealed or signed under key {key_id[:32]!r}, which this process does not hold "
            "(give every process the same keys, newest first)",
        )


class RefusedByDatabase(RoutineError):
    """PostgreSQL refused a write for good (a value it cannot hold, a constraint); retrying would not help.

    The message names the operation and PostgreSQL's reason, never the refused values.
    """

    code = "REFUSED_BY_DATABASE"

    def __init__(self, operation: str, sqlstate: str | None, reason: str) -> None:
        self.operation, self.sqlstate = operation, sqlstate
        super().__init__(f"{operation}: PostgreSQL refused it ({sqlstate or 'no SQLSTATE'}: {reason})")


# ---- requests: what a caller asked for ----------------------------------------------------------------


class RequestError(RunctxError):
    """What a caller asked for cannot be given; nothing was changed."""

    code = "REQUEST_ERROR"


class RunExists(RequestError):
    """A run holds the idempotency key a new run was created with: nothing was created.
    ``run_id`` and ``request_digest``: the run that holds it, and what its submit asked for."""

    code = "RUN_EXISTS"

    def __init__(self, key: str, run_id: str, request_digest: str | None) -> None:
        self.key, self.run_id, self.request_digest = key, run_id, request_digest
        super().__init__(f"idempotency key {key!r} is held by run {run_id}")


class SignalRefused(RequestError):
    """A signal for an event the run has had already (consumed, waiting to be, or timed out):
    nothing was stored."""

    code = "SIGNAL_REFUSED"
    severity = Severity.WARNING


class RunEnded(RequestError):
    """An operation that needs a running run was asked of one that has ended: nothing was changed."""

    code = "RUN_ENDED"
    severity = Severity.WARNING


class NotFound(RequestError, KeyError):
    code = "NOT_FOUND"
    severity = Severity.WARNING

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class SettingsError(RequestError):
    """Settings that cannot work together; the message names the setting to change."""

    code = "SETTINGS_ERROR"

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {problem}")


class RunTimeout(RequestError, TimeoutError):
    """A caller stopped waiting for a run; the run itself goes on."""

    code = "RUN_TIMEOUT"
    severity = Severity.WARNING
