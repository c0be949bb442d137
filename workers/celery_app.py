"""The Celery app: `celery -A workers worker` finds it as ``workers.app``.

A worker node resolves its servers and checks that it can do its job when it starts
(`workers.node_checks.NodeChecks`, a bootstep that runs in its main process before the pool
forks): it starts or joins the embedded stack if no URL is configured, brings the L3 schema up to
date, and refuses to start, with one line naming the setting, if it cannot work. Importing the app
does none of this. With ``RUNCTX_METRICS_PORT`` set, it also serves Prometheus metrics of all its
processes (``workers.metrics``).
"""

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_ready

from state.settings import get_settings
from state.tiers.redis_l2 import RedisTier
from workers import kombu_redis_fix, metrics
from workers.node_checks import NodeChecks

log = logging.getLogger(__name__)

kombu_redis_fix.install()

app = Celery("runctx")
app.config_from_object("celeryconfig")
app.steps["worker"].add(NodeChecks)

# Importing the runtime connects its signal handlers (every pool process gets its own runtime)
# and gives the tasks their engine.
import workers.runtime  # noqa: F401

@worker_ready.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    """After the pool forked (its children must not inherit the listening socket)."""
    node = getattr(sender, "controller", None)  # the consumer's worker, which `NodeChecks` set up
    servers, metrics_dir = getattr(node, "runctx_servers", None), getattr(node, "runctx_metrics_dir", None)
    settings = get_settings()
    if settings.metrics_port is None or metrics_dir is None or servers is None:
        return
    l2 = RedisTier.from_url(servers.redis_url, prefix=settings.key_prefix, config=settings.cache_config())
    try:
        metrics.serve(settings.metrics_port, settings.metrics_address, l2, metrics_dir)
    except OSError as exc:
        log.error("RUNCTX_METRICS_PORT=%d: cannot serve metrics (%s)", settings.metrics_port, exc.strerror or exc)
