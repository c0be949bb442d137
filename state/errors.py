"""Typed errors of the state layer, each with a severity (design document: error handling)."""

from __future__ import annotations

from enum import Enum
from typing import Any


class Severity(str, Enum):
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class RunctxError(Exception):
    """Base of every runctx error; ``code`` matches the design document's error names."""

    code: str = "RUNCTX_ERROR"
    severity: Severity = Severity.ERROR

    def __init__(self, message: str, *, severity: Severity | None = None) -> None:
        super().__init__(message)
        if severity is not None:
            self.severity = severity


class LimitExceeded(RunctxError, ValueError):
    """A value or context is larger than its ResourceLimits allow; nothing was changed."""

    code = "LIMIT_EXCEEDED"

    def __init__(self, variable: str, limit: str, size: int, maximum: int) -> None:
        self.variable, self.limit, self.size, self.maximum = variable, limit, size, maximum
        super().__init__(f"variable {variable!r}: {limit} is {maximum}, got {size}")


class InvalidValue(RunctxError, ValueError):
    """A variable name or value that runctx cannot store (not JSON, bad name, unknown scope...)."""

    code = "INVALID_VALUE"


class SensitivityViolation(RunctxError, ValueError):
    """An attempt to lower the sensitivity of a variable (e.g. in a child context)."""

    code = "SENSITIVITY_VIOLATION"


class MergeConflict(RunctxError):
    """A merge under the FAIL strategy met variables that differ on both sides."""

    code = "MERGE_CONFLICT"

    def __init__(self, variables: list[str]) -> None:
        self.variables = variables
        super().__init__(f"conflicting variables under FAIL strategy: {', '.join(variables)}")


class VersionConflict(RunctxError):
    """A compare-and-set was refused: someone else committed first. Resolve and retry."""

    code = "VERSION_CONFLICT"
    severity = Severity.WARNING

    def __init__(self, tier: str, key: str, expected: int | None, actual: int | None) -> None:
        self.tier, self.key, self.expected, self.actual = tier, key, expected, actual
        super().__init__(f"{tier}: stale write to {key}: expected version {expected}, found {actual}")


class NotFound(RunctxError, KeyError):
    code = "NOT_FOUND"
    severity = Severity.WARNING

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ContextCorruption(RunctxError):
    """A stored entry whose checksum or shape is wrong; it is dropped and reloaded from L3."""

    code = "CONTEXT_CORRUPTION"
    severity = Severity.CRITICAL

    def __init__(self, key: str, detail: str) -> None:
        self.key, self.detail = key, detail
        super().__init__(f"corrupt entry {key}: {detail}")


class TransactionFailed(RunctxError):
    """An L3 transaction that still failed after its retries."""

    code = "TRANSACTION_FAILED"

    def __init__(self, operation: str, attempts: int, cause: BaseException) -> None:
        self.operation, self.attempts, self.cause = operation, attempts, cause
        super().__init__(f"{operation} failed after {attempts} attempt(s): {cause}")


class CommunicationFailure(RunctxError):
    """A tier (Redis or PostgreSQL) could not be reached."""

    code = "COMMUNICATION_FAILURE"
    severity = Severity.CRITICAL

    def __init__(self, tier: str, cause: BaseException | str) -> None:
        self.tier, self.cause = tier, cause
        super().__init__(f"{tier} unreachable: {cause}")


def describe(error: BaseException) -> dict[str, Any]:
    """A loggable summary of an error (never includes variable values)."""
    if isinstance(error, RunctxError):
        return {"code": error.code, "severity": error.severity.value, "message": str(error)}
    return {"code": "UNEXPECTED", "severity": Severity.ERROR.value, "message": f"{type(error).__name__}: {error}"}
