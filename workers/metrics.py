"""A worker node's Prometheus endpoint: ``RUNCTX_METRICS_PORT``, served by the node's main process.

The work happens in the prefork children, so the figures are theirs: before any child forks
(``celeryd_init``) the main process points prometheus-client at a directory of its own
(``PROMETHEUS_MULTIPROC_DIR``; the children inherit it), and each scrape adds up what every
child, live or dead, wrote there. Invariants:

- the directory is empty when the node starts (a previous node's counts are not this node's);
- a child's counters survive it (a counter never goes down); its live gauges (the change
  listener's state) leave with it: gauges of processes that no longer exist are dropped at scrape;
- the write-behind backlog is read from L2 at scrape, so it is the cluster's, not this node's.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, multiprocess, start_http_server, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from state.metrics import WRITE_BEHIND_OLDEST, WRITE_BEHIND_PENDING
from state.store import TieredStore

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"


def use_multiprocess_dir() -> Path:
    """Give this process and the children it forks a fresh metrics directory; call before they fork.

    prometheus-client decides at import where values live; ``values.ValueClass`` is set again so
    that instruments built from now on (``state.metrics`` builds them on first use) write files.
    """
    given = os.environ.get(ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="runctx-metrics-"))
        os.environ[ENV] = str(path)
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    values.ValueClass = values.get_value_class()
    return path


class _DeadProcessGauges(Collector):
    """Drops the live gauges of processes that are gone (a killed child cannot say so itself) and
    of the main process, which runs no steps; registered before the multiprocess collector."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterator[Any]:
        for file in self.path.glob("gauge_live*_*.db"):
            pid = int(file.stem.rsplit("_", 1)[1])
            if pid == os.getpid() or not psutil.pid_exists(pid):
                multiprocess.mark_process_dead(pid, str(self.path))
        return iter(())


class _WriteBehindBacklog(Collector):
    """Changes committed to L2 and not yet written to L3, and the age of the oldest, read from L2."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        try:
            pending, oldest = self.store.pending_flushes()
        except Exception as exc:  # a scrape must answer even while Redis is away
            log.warning("metrics: cannot read the write-behind backlog from L2: %s", exc)
            return
        yield GaugeMetricFamily(WRITE_BEHIND_PENDING, "Contexts with changes not yet written to L3", value=pending)
        age = 0.0 if oldest is None else max(0.0, time.time() - oldest)
        yield GaugeMetricFamily(WRITE_BEHIND_OLDEST, "Age of the oldest change not yet written to L3", value=age)


def serve(port: int, address: str, store: TieredStore, path: Path) -> None:
    """Serve every process's metrics on ``address:port`` from a thread of this (the main) process."""
    registry = CollectorRegistry()
    registry.register(_DeadProcessGauges(path))
    multiprocess.MultiProcessCollector(registry, path=str(path))
    registry.register(_WriteBehindBacklog(store))
    start_http_server(port, addr=address, registry=registry)
    log.info("metrics on http://%s:%d/metrics", address, port)
