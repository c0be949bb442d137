"""The three tiers, each a contract (`contracts`) with a real implementation and an in-memory twin.

    L1  local.LocalCache         one process's LRU (cachetools)
    L2  redis_l2.RedisTier       Redis, shared by every worker      twin: memory_l2.MemoryL2
    L3  postgres_l3.PostgresTier PostgreSQL, the authoritative one  twin: memory_l3.MemoryL3
"""

from state.tiers.contracts import (
    FINAL_STATUSES,
    ConfigEntry,
    ExportRecord,
    L1Tier,
    L2Tier,
    L3Tier,
    RunRow,
    StepStart,
    StoredContext,
)

__all__ = [
    "FINAL_STATUSES",
    "ConfigEntry",
    "ExportRecord",
    "L1Tier",
    "L2Tier",
    "L3Tier",
    "RunRow",
    "StepStart",
    "StoredContext",
]
