"""The in-memory twins of L2 and L3: the same contracts in one process, for fast engine tests (the
contract suite holds them to the Lua and SQL they stand in for).

    base.py       the twin of L2's storage, under one lock
    contexts.py   contexts and the write-behind schedule   (L2Contexts)
    records.py    configurations, run records, bus, leases (L2Configs, L2RunRecords, L2Bus, L2Leases)
    l3.py         the twin of PostgreSQL                   (L3Tier)
"""

from __future__ import annotations

from state.tiers.memory.contexts import MemoryContexts
from state.tiers.memory.l3 import MemoryL3
from state.tiers.memory.records import MemoryConfigs, MemoryRunRecords

__all__ = ["MemoryL2", "MemoryL3"]


class MemoryL2(MemoryContexts, MemoryConfigs, MemoryRunRecords):
    """L2 in one process's memory (`L2Tier`): owns its entries, write-behind schedule and run records.

    Promises what `RedisTier` promises (compare-and-set commits, checksummed entries, dirty entries
    that never expire), atomically under one lock, with TTLs measured by ``clock``.
    """
