"""The Celery app: `celery -A workers worker` finds it as ``workers.app``.

A worker node resolves its servers and checks that it can do its job when it starts
(`workers.node_checks.NodeChecks`, a bootstep that runs in its main process before the pool
forks): it starts or joins the embedded stack if no URL is configured, brings the L3 schema up to
date, and refuses to start, with one line naming the setting, if it cannot work. Importing the app
does none of this. With ``RUNCTX_METRICS_PORT`` set, it also serves Prometheus metrics of all its
processes (``workers.metrics``).
"""

import gc
import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

from state.settings import get_settings
from state.store import TieredStore
from workers import kombu_redis_fix, metrics
from workers.node_checks import NodeChecks
from workers.runtime import current, runtime

log = logging.getLogger(__name__)

kombu_redis_fix.install()

app = Celery("runctx")
app.config_from_object("celeryconfig")
app.steps["worker"].add(NodeChecks)

import workers.celery_tasks  # noqa: E402,F401  (registers the tasks in every process that imports the app)


@worker_process_init.connect
def _start_process(**_: object) -> None:
    """A pool process's runtime is built after the fork, with its background threads."""
    runtime(app).start_background()
    # What the process holds now (Celery, kombu, SQLAlchemy, pydantic) lives as long as it does: out
    # of the collector's sight, a full collection no longer walks all of it on some step's time.
    gc.freeze()


@worker_process_shutdown.connect
def _stop_process(**_: object) -> None:
    own = current()
    if own is not None:
        own.stop()


@worker_ready.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    """After the pool forked (its children must not inherit the listening socket)."""
    node = getattr(sender, "controller", None)  # the consumer's worker, which `NodeChecks` set up
    servers, metrics_dir = getattr(node, "runctx_servers", None), getattr(node, "runctx_metrics_dir", None)
    settings = get_settings()
    if settings.metrics_port is None or metrics_dir is None or servers is None:
        return
    store = TieredStore.from_settings(settings, servers.redis_url, servers.database_url)
    try:
        metrics.serve(settings.metrics_port, settings.metrics_address, store, metrics_dir)
    except OSError as exc:
        log.error("RUNCTX_METRICS_PORT=%d: cannot serve metrics (%s)", settings.metrics_port, exc.strerror or exc)
