"""The sizes, lifetimes and limits runctx runs with: the one place their defaults are declared
(the RUNCTX_* settings take theirs from here)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ResourceLimits(BaseModel):
    model_config = ConfigDict(frozen=True)

    max_variables: int = Field(default=10_000, ge=1)
    # What one value may be: one over value_ref_bytes is stored once, beside the
    # contexts, which hold a reference to it, so a large value costs a step nothing it leaves alone.
    max_value_bytes: int = Field(default=64 << 20, ge=1)
    value_ref_bytes: int = Field(default=256 << 10, ge=1)  # a value larger is stored once and referenced
    max_context_bytes: int = Field(default=16 << 20, ge=1)
    max_child_depth: int = Field(default=16, ge=0)


class StateCacheConfig(BaseModel):
    """Sizes, lifetimes and retries of the tiers; the one place their defaults are declared."""

    model_config = ConfigDict(frozen=True)

    l1_contexts: int = Field(default=1000, ge=1, description="contexts each process keeps in its LRU")
    l1_configs: int = Field(default=1000, ge=1, description="routine definitions and configurations per process")
    l1_config_ttl_s: float = Field(
        default=30.0, gt=0, description="longest a process serves a configuration it missed an invalidation for"
    )
    l2_context_ttl_s: int = Field(default=900, ge=1, description="TTL of a clean context entry in Redis")
    l2_config_ttl_s: int = Field(default=3600, ge=1, description="TTL of a routine or configuration in Redis")
    l1_update_max_bytes: int = Field(
        default=16384, ge=0, description="a step's commit carries contexts up to this size to every process's L1"
    )
    write_behind_debounce_s: float = Field(default=0.25, ge=0, description="L3 write this long after the last change")
    write_behind_max_delay_s: float = Field(default=2.0, ge=0, description="... but never later than this after the first")
    l3_retry_attempts: int = Field(default=4, ge=1, description="tries of an L3 transaction on transient errors")
    l3_retry_base_delay_s: float = Field(default=0.05, ge=0, description="first backoff between those tries")
    history: bool = Field(default=True, description="keep each run's history: what every step changed (`state.history`)")
