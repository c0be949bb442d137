"""What a worker node must be able to do before it takes work: checked when it starts (`NodeChecks`,
a bootstep that stops the node with one line naming the setting) and, for every running process,
by `runctx check` (`process_checks`, answered on the control channel).

A node that starts although it cannot do its job leaves runs hanging: a key it lacks makes it
drop other nodes' entries, a module it cannot import fails steps the others could run.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from celery import bootsteps

from runctx.embedded import Servers, celery_broker_url, resolve
from state.errors import RunctxError, SettingsError
from state.migrate import schema_problem, upgrade
from state.settings import Settings, get_settings
from state.store import TieredStore
from state.tiers.redis import is_cluster
from workers import metrics

log = logging.getLogger("runctx.worker")

EXIT_CANNOT_START = 1


def check_broker(servers: Servers) -> None:
    """Celery's Redis transport does not speak Redis Cluster: with L2 on a cluster, the broker is
    a plain Redis or RabbitMQ of its own."""
    if servers.broker_url == celery_broker_url(servers.redis_url) and is_cluster(servers.redis_url):
        raise SettingsError(
            "RUNCTX_BROKER_URL",
            "RUNCTX_REDIS_URL names a node of a Redis Cluster, which cannot be Celery's broker; "
            "set RUNCTX_BROKER_URL to a plain Redis or a RabbitMQ",
        )


def migrate(servers: Servers) -> None:
    try:
        upgrade(servers.database_url)
    except Exception as exc:  # whatever Alembic or the driver raise: the node cannot use this database
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SettingsError("RUNCTX_DATABASE_URL", f"the L3 schema cannot be brought up to date: {reason}") from None


def check_keys(servers: Servers, settings: Settings) -> None:
    """A node without a key that sealed stored values refuses to start, saying which is missing."""
    store = TieredStore.from_settings(settings, servers.redis_url, servers.database_url)
    try:
        store.maintenance.check_keys(settings.keyring())
    finally:
        store.close()


def action_module_problem(settings: Settings) -> str | None:
    """Why a module RUNCTX_ACTION_MODULES allows cannot be imported here (None: each one can)."""
    for module in settings.allowed_action_modules():
        try:
            importlib.import_module(module)
        except Exception as exc:  # an ImportError, or whatever the module raises while it loads
            return f"module {module!r} cannot be imported on this node ({type(exc).__name__}: {exc})"
    return None


def check_node(settings: Settings) -> Servers:
    """Every check a node passes before it takes work; the servers it uses. SettingsError names the
    setting of the first check that fails."""
    servers = resolve(settings)
    check_broker(servers)
    migrate(servers)
    check_keys(servers, settings)
    problem = action_module_problem(settings)
    if problem:
        raise SettingsError("RUNCTX_ACTION_MODULES", problem)
    return servers


def process_checks(store: TieredStore, database_url: str, settings: Settings) -> dict[str, str]:
    """The same checks for a running process (`runctx check` asks every one): "ok" or the problem."""
    results: dict[str, str] = {}

    def check(name: str, problem: Any) -> None:
        try:
            results[name] = problem() or "ok"
        except RunctxError as exc:
            results[name] = str(exc)
        except Exception as exc:  # a check reports, it does not raise
            results[name] = f"{type(exc).__name__}: {exc}"

    held = {key_id for key_id, _ in settings.keyring().keys}
    check("keys", lambda: _missing_keys(store, held))
    check("schema", lambda: schema_problem(database_url))
    check("action_modules", lambda: action_module_problem(settings))
    return results


def _missing_keys(store: TieredStore, held: set[str]) -> str | None:
    missing = sorted(store.maintenance.key_ids() - held)
    return f"RUNCTX_ENCRYPTION_KEYS lacks key(s) {', '.join(missing)} that sealed stored values" if missing else None


class NodeChecks(bootsteps.Step):
    """A bootstep of the worker: before the pool starts (its ``__init__`` runs while the worker is
    built), the node resolves its servers and passes `check_node`, or exits with one line naming
    the setting (Celery swallows what a signal handler raises; it lets this stop the node). Then
    Celery is pointed at the node's broker, and the metrics directory is made before anything
    counts and before the pool forks (``worker.runctx_servers``, ``worker.runctx_metrics_dir``)."""

    name = "runctx node checks"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        settings = get_settings()
        try:
            servers = check_node(settings)
        except RunctxError as exc:
            log.critical("runctx: this worker cannot start: %s", exc)
            raise SystemExit(EXIT_CANNOT_START) from None
        worker.runctx_servers = servers
        worker.runctx_metrics_dir = metrics.use_multiprocess_dir() if settings.metrics_port is not None else None
        conf = worker.app.conf
        conf.broker_url = celery_broker_url(servers.broker_url)
        conf.broker_use_ssl = settings.broker_tls_options(servers.broker_url)
