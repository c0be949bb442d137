"""Each worker process's own runtime: its store (and so its L1), engine and background threads.

Connections are opened after the fork, in ``worker_process_init`` (connected in
`workers.celery_app`), which must return within about 4 s: it only starts threads, it does not
wait for them. A process that never got the signal (a submitter, a threads pool) builds its
runtime on first use, without the threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from runctx.embedded import resolve
from state.change_events import ChangeListener
from state.metrics import metrics
from state.settings import get_settings
from state.store import TieredStore
from state.tiers.redis import connect
from tasks.engine import RunEngine
from tasks.watchdog import Watchdog
from workers.backlog import BrokerBacklog
from workers.control import ControlChannel, process_identity
from workers.dispatcher import STEP_TASK, CeleryDispatcher
from workers.envelopes import StepEnvelopes
from workers.node_checks import process_checks

log = logging.getLogger(__name__)

FLUSH_POLL_S = 0.1  # how often each process looks for write-behinds whose debounce window has passed
FLUSH_LEASE_S = 5.0  # a claimed flush whose task never ran comes due again after this
RETENTION_SWEEP_S = 3600.0  # how often finished runs past RUNCTX_RETENTION_DAYS are pruned
# How often each process counts a heartbeat in Redis: a rollback of Redis to a state older than this
# is noticed at once; a shorter one is left to the stall timeout.
CONTINUITY_TICK_S = 1.0


class ProcessRuntime:
    """One process's share of runctx: owns its store (its L1 and connections), engine, control
    channel subscription, L3 change listener, write-behind dispatcher thread, and the watchdog
    thread (heartbeats of the steps it runs; the stall scan while it holds the watchdog lease;
    the retention prune when its turn comes).

    Promises: built after the fork, never shared with a parent or child process; its threads only
    make caches fresher or flushes sooner, so a process without them (a submitter) is still correct.
    """

    def __init__(self, app: Celery) -> None:
        settings = self.settings = get_settings()
        servers = resolve(settings)
        self.app = app
        self.pid = os.getpid()
        self.database_url = servers.database_url
        self.store = TieredStore.from_settings(settings, servers.redis_url, servers.database_url)
        self.dispatcher = CeleryDispatcher(app)
        self.engine = RunEngine(
            self.store, self.dispatcher, max_attempts=settings.step_max_attempts, limits=settings.resource_limits(),
            max_items=settings.max_items, time_limits=(SoftTimeLimitExceeded,),
        )
        self.control = ControlChannel(self.store, connect(servers.redis_url), settings.key_prefix)
        # Plans compiled ahead (a routine was stored, or a run of it began), on a thread of their own: a compile of a
        # large routine must not hold up the invalidations the control channel carries.
        self._preparing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runctx-plans")
        self.control.prepare = lambda routine, version: self._preparing.submit(self._prepare, routine, version)
        self.watch_interval_s = max(0.2, min(5.0, settings.stall_timeout_s / 4))
        self.watchdog = Watchdog(
            self.engine, stall_timeout_s=settings.stall_timeout_s, confirm_after_s=1.5 * self.watch_interval_s,
            backlog=BrokerBacklog(app, [queue.name for queue in app.conf.task_queues or ()]),
        )
        self.retention_s = None if settings.retention_days is None else settings.retention_days * 86400
        self.listener: ChangeListener | None = None
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._watcher: threading.Thread | None = None

    def start_background(self) -> None:
        """Subscribe to the control channel, listen to L3 change events, dispatch due write-behinds;
        and, when the broker is L2's Redis, let each step's commit send its successor."""
        if self.settings.step_outbox:
            self.dispatcher.envelopes = StepEnvelopes.for_broker(self.app.tasks[STEP_TASK], self.store)
        if self.dispatcher.envelopes is None:
            why = "the broker is not L2's Redis" if self.settings.step_outbox else "RUNCTX_STEP_OUTBOX is off"
            log.info("a step's successor is sent after its commit (%s)", why)
        self.control.start()
        self.listener = ChangeListener(
            self.database_url, self.control.relay_change, on_connected=self.store.invalidation.clear
        ).start(wait_s=0)
        listener, settings = self.listener, self.settings
        self.control.health = lambda: {
            "listener": listener.connected, "node_pid": os.getppid(),
            "checks": process_checks(self.store, self.database_url, settings),
        }
        self._flusher = threading.Thread(target=self._dispatch_due_flushes, name="runctx-write-behind", daemon=True)
        self._flusher.start()
        self._watcher = threading.Thread(target=self._watch, name="runctx-watchdog", daemon=True)
        self._watcher.start()

    def _prepare(self, routine: str, version: int) -> None:
        try:
            self.engine.plans.get(routine, version)
        except Exception as exc:  # a hint only: the first step will say what is wrong
            log.debug("could not compile %s@%d ahead: %s", routine, version, exc)

    def stop(self) -> None:
        self._stop.set()
        self._preparing.shutdown(wait=False, cancel_futures=True)
        self.control.stop()
        self.dispatcher.close()
        if self.listener is not None:
            self.listener.stop()

    def _watch(self) -> None:
        """Count a heartbeat in Redis every second (a count that goes back says Redis did); every
        watch interval, say that the steps this process runs are alive and, while leader, scan for
        stalled runs (at once, too, when this process found that Redis went back)."""
        identity = process_identity()
        tick_s = min(CONTINUITY_TICK_S, self.watch_interval_s)
        next_watch = time.monotonic()
        while True:
            try:
                went_back = self.watchdog.check_continuity()
            except Exception:  # Redis does not answer: the next tick tries again
                went_back = False
            if went_back or time.monotonic() >= next_watch:
                next_watch = time.monotonic() + self.watch_interval_s
                self._watch_round(identity)
            if self._stop.wait(tick_s):
                return

    def _watch_round(self, identity: str) -> None:
        metrics().change_listener_up.set(1 if self.listener is not None and self.listener.connected else 0)
        try:
            self.store.ledger.touch_progress(sorted(set(self.engine.running.values())), time.time())
            if self.store.hold_lease("watchdog", identity, self.watch_interval_s * 3):
                self.watchdog.scan()
            self._apply_retention(identity)
        except Exception:
            log.exception("watchdog round failed; trying again")

    def _apply_retention(self, identity: str) -> None:
        """RUNCTX_RETENTION_DAYS without Celery beat: one process of the whole cluster prunes, about
        once an hour (more often for a retention of less than 4 hours). The lease is taken under
        a name used once, so nobody, this process included, takes it again before it expires."""
        if self.retention_s is None:
            return
        every_s = min(RETENTION_SWEEP_S, max(1.0, self.retention_s / 4))
        if not self.store.hold_lease("retention", f"{identity}:{time.time()!r}", every_s):
            return
        report = self.store.maintenance.prune(self.retention_s)
        if report.runs:
            log.info("retention: pruned %d finished run(s) and %d context(s)", report.runs, report.contexts)

    def _dispatch_due_flushes(self) -> None:
        """The debounce of the write-behind: whichever process claims a due context sends its task.

        The pending set is in Redis, so a flush scheduled by a process that died is sent by another.
        """
        while not self._stop.wait(FLUSH_POLL_S):
            try:
                due = self.store.claim_due(lease_s=FLUSH_LEASE_S, limit=50, now=time.time())
                if due:
                    self.dispatcher.flush_many(due)
            except Exception:
                log.exception("dispatching due write-behinds failed; trying again")


_runtime: ProcessRuntime | None = None
_lock = threading.Lock()


def runtime(app: Celery) -> ProcessRuntime:
    """This process's runtime (a forked child never uses its parent's)."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = ProcessRuntime(app)
        return _runtime


def current() -> ProcessRuntime | None:
    """This process's runtime if it has one (a forked child's parent's does not count)."""
    return _runtime if _runtime is not None and _runtime.pid == os.getpid() else None
