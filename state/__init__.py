"""The state domain of runctx: the RunContext model, conflict resolution, the three tiers and the
services built on them.

The lowest layer: knows nothing of Celery, tasks or workers, and is the only place that speaks
SQL (`tiers/postgres/`, `schema.py`, `migrations/`, `health.py`) or Lua (`tiers/lua/`).

    models.py, applied.py, conflicts.py, limits.py   the RunContext and its rules (pure)
    errors.py                            every error runctx raises, in one tree
    keys.py                              every Redis key and cache key name
    codec.py, sealing.py                 values to bytes (L2) and documents (L3); sealed values
    bus.py                               the control bus's messages
    tiers/                               L1, L2, L3: contracts, real tiers, in-memory twins
    store.py                             the tiered store: reads, commits, write-behind
    configs.py, ledger.py                routine definitions and configurations; runs and their records
    rewind.py, invalidation.py           rebuilding a lost lineage; keeping caches in step
    maintenance.py                       prune, key checks and rotation
    change_events.py                     L3 change events (LISTEN/NOTIFY)
    settings.py, metrics.py              RUNCTX_* settings; Prometheus instruments
"""

from state.conflicts import MergeResult, resolve_variable_conflicts
from state.errors import (
    CommunicationFailure,
    ContextCorruption,
    InfrastructureError,
    InvalidValue,
    LimitExceeded,
    MergeConflict,
    NotFound,
    RequestError,
    RoutineError,
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
    "InfrastructureError",
    "InvalidValue",
    "LimitExceeded",
    "MergeConflict",
    "MergeResult",
    "NotFound",
    "RequestError",
    "ResourceLimits",
    "RoutineError",
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
