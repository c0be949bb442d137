"""The Celery app: `celery -A workers worker` finds it as ``workers.app``.

A worker node resolves its servers when it starts (``celeryd_init``, in its main process, before
any pool process forks): it starts or joins the embedded stack if no URL is configured and brings
the L3 schema up to date. Importing the app does neither. With ``RUNCTX_METRICS_PORT`` set, it
also serves Prometheus metrics of all its processes (``workers.metrics``).
"""

import logging
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import celeryd_init, worker_ready

from runctx.embedded import Servers, celery_broker_url, resolve
from state.errors import SettingsError
from state.migrate import upgrade
from state.settings import get_settings
from state.store import TieredStore
from state.tiers.redis_l2 import RedisTier, is_cluster
from workers import kombu_redis_fix, metrics

log = logging.getLogger(__name__)

kombu_redis_fix.install()

app = Celery("runctx")
app.config_from_object("celeryconfig")

# Importing the runtime connects its signal handlers (every pool process gets its own runtime)
# and gives the tasks their engine.
import workers.runtime  # noqa: F401


def check_broker(servers: Servers) -> None:
    """Celery's Redis transport does not speak Redis Cluster: with L2 on a cluster, the broker is
    a plain Redis or RabbitMQ of its own."""
    if servers.broker_url == celery_broker_url(servers.redis_url) and is_cluster(servers.redis_url):
        raise SettingsError(
            "RUNCTX_BROKER_URL",
            "RUNCTX_REDIS_URL names a node of a Redis Cluster, which cannot be Celery's broker; "
            "set RUNCTX_BROKER_URL to a plain Redis or a RabbitMQ",
        )


def check_keys(servers: Servers) -> None:
    """A node without a key that sealed stored values refuses to start, saying which is missing."""
    settings = get_settings()
    store = TieredStore.from_settings(settings, servers.redis_url, servers.database_url)
    try:
        store.check_keys(settings.keyring())
    finally:
        store.close()


_metrics_dir: Path | None = None
_servers: Servers | None = None


@celeryd_init.connect
def _resolve_servers(conf: Any = None, **_: Any) -> None:
    global _metrics_dir, _servers
    if get_settings().metrics_port is not None:  # first: before anything counts, and before the pool forks
        _metrics_dir = metrics.use_multiprocess_dir()
    servers = _servers = resolve()
    check_broker(servers)
    upgrade(servers.database_url)
    check_keys(servers)
    if conf is not None:
        conf.broker_url = servers.broker_url
        conf.broker_use_ssl = get_settings().broker_tls_options(servers.broker_url)


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    """After the pool forked (its children must not inherit the listening socket)."""
    settings = get_settings()
    if settings.metrics_port is None or _metrics_dir is None or _servers is None:
        return
    l2 = RedisTier.from_url(_servers.redis_url, prefix=settings.key_prefix, config=settings.cache_config())
    try:
        metrics.serve(settings.metrics_port, settings.metrics_address, l2, _metrics_dir)
    except OSError as exc:
        log.error("RUNCTX_METRICS_PORT=%d: cannot serve metrics (%s)", settings.metrics_port, exc.strerror or exc)
