"""The state domain of runctx: the RunContext model, conflict resolution, the three tiers and the tiered store.

Knows nothing of Celery.
"""

from state.conflicts import MergeResult, resolve_variable_conflicts
from state.errors import (
    CommunicationFailure,
    ContextCorruption,
    InvalidValue,
    LimitExceeded,
    MergeConflict,
    NotFound,
    RunctxError,
    SensitivityViolation,
    Severity,
    TransactionFailed,
    VersionConflict,
)
from state.models import (
    ConflictResolutionStrategy,
    ContextVariable,
    DataSensitivity,
    ExportDeclaration,
    ExportDestination,
    ResourceLimits,
    RunContext,
    RunContextInit,
    StateCacheConfig,
    VariableConflict,
)

__all__ = [
    "CommunicationFailure",
    "ConflictResolutionStrategy",
    "ContextCorruption",
    "ContextVariable",
    "DataSensitivity",
    "ExportDeclaration",
    "ExportDestination",
    "InvalidValue",
    "LimitExceeded",
    "MergeConflict",
    "MergeResult",
    "NotFound",
    "ResourceLimits",
    "RunContext",
    "RunContextInit",
    "RunctxError",
    "SensitivityViolation",
    "Severity",
    "StateCacheConfig",
    "TransactionFailed",
    "VariableConflict",
    "VersionConflict",
    "resolve_variable_conflicts",
]
