"""Each worker process's own runtime: its store (and so its L1), engine and background threads.

Connections are opened after the fork, in ``worker_process_init``, which must return within
about 4 s: it only starts threads, it does not wait for them. A process that never got the
signal (a submitter, a threads pool) builds its runtime on first use, without the threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from celery.signals import worker_process_init, worker_process_shutdown

from runctx.servers import resolve
from state.change_events import ChangeListener
from state.settings import get_settings
from state.store import TieredStore
from tasks.engine import RunEngine
from tasks.records import RunRecords
from workers.control import ControlChannel

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.5
SWEEP_GRACE_S = 1.0  # a flush this overdue lost the task that should have done it


class ProcessRuntime:
    def __init__(self) -> None:
        from tasks.celery_tasks import CeleryDispatcher  # tasks import this module lazily too

        settings = get_settings()
        servers = resolve(settings, migrate=False)
        self.pid = os.getpid()
        self.database_url = servers.database_url
        self.store = TieredStore.from_settings(settings, servers.redis_url, servers.database_url)
        self.records = RunRecords(self.store.l2.client, settings.key_prefix)
        self.engine = RunEngine(
            self.store,
            self.records,
            CeleryDispatcher(settings.write_behind_debounce_s),
            max_attempts=settings.step_max_attempts,
            limits=settings.resource_limits(),
        )
        self.control = ControlChannel(self.store)
        self.listener: ChangeListener | None = None
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def start_background(self) -> None:
        """Subscribe to the control channel, listen to L3 change events, sweep overdue flushes."""
        self.control.start()
        self.listener = ChangeListener(
            self.database_url, self.control.relay_change, on_connected=self.store.l1.clear
        ).start(wait_s=0)
        self._sweeper = threading.Thread(target=self._sweep, name="runctx-flush-sweeper", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()
        self.control.stop()
        if self.listener is not None:
            self.listener.stop()

    def _sweep(self) -> None:
        while not self._stop.wait(SWEEP_INTERVAL_S):
            try:
                for context_id in self.store.l2.due_for_flush(time.time() - SWEEP_GRACE_S, limit=50):
                    self.engine.flush(context_id)
            except Exception:
                log.exception("flush sweep failed; trying again")


_runtime: ProcessRuntime | None = None
_lock = threading.Lock()


def runtime() -> ProcessRuntime:
    """This process's runtime (a forked child never uses its parent's)."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = ProcessRuntime()
        return _runtime


@worker_process_init.connect
def _start_process(**_: object) -> None:
    runtime().start_background()


@worker_process_shutdown.connect
def _stop_process(**_: object) -> None:
    if _runtime is not None and _runtime.pid == os.getpid():
        _runtime.stop()
