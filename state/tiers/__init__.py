"""The three tiers, each a set of contracts (`contracts`, the data they exchange in `data`) with a
real implementation and an in-memory twin.

    L1  local.LocalCache     one process's LRU (cachetools)
    L2  redis.RedisTier      Redis, shared by every worker      twin: memory.MemoryL2
    L3  postgres.PostgresTier PostgreSQL, the authoritative one  twin: memory.MemoryL3
"""
