"""The watchdog for stalled work: a running run that shows no progress for the stall timeout is
resumed from what the tiers hold (a rewind), whatever stopped it. It also ends the waits whose
deadline passed (`tasks.waiting`), and leaves alone a run that waits for an event: it rests.

What it covers: a step taken by a node that died (its message waits in the Redis transport's
unacked set until the visibility timeout), a broker that lost its messages, a Redis that came back
empty, a finalize that never ran. What it leaves alone: a run whose next message only waits in a
long queue. While messages wait in the broker's queues (``backlog``, a passive declare of each),
a run that shows no progress is taken for queued, not stalled, and is resumed once the queues have
been empty for a stall timeout and it still has not moved (a message taken just as the queue
emptied has its step's heartbeat within that): a busy cluster is not a broken one, and a lost
message is found a stall timeout after the backlog has drained. Progress is a step finishing, or a running step's process saying
it is alive (`ProcessRuntime` touches the run's progress while it runs a step), so a long step is
not mistaken for a stall. Runs come from L3 (`runs`), which survives anything that happens to Redis.

One process scans at a time (the holder of a lease in Redis). A run's last move is the newest of
its progress record in Redis and its row's last change in L3 (creation, rewind), so a Redis that
came back empty makes a long-running run look stalled at once, as it should. A run resumed once and
still not moving waits twice as long before the next resume, so a run whose steps only wait in a
long queue is not resumed again and again.

A Redis that lost its data, or went back to an older snapshot (a failover to a lagging replica),
is noticed without waiting for the stall timeout: every process counts its heartbeats on one
counter in Redis (`check_continuity`), and a count not above the last one it saw means Redis went
back. The process notes when, and the scan resumes at once every running run that has not moved
since (a run resumed or moving after the note is left alone, so a note acts once per run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from state.errors import RoutineError
from state.tiers.data import RunRow
from tasks.engine import RunEngine

log = logging.getLogger(__name__)


class Watchdog:
    """Resumes stalled runs. Owns only its memory of how often it resumed each run; the truth (runs,
    epochs, progress) is in the tiers."""

    def __init__(
        self,
        engine: RunEngine,
        *,
        stall_timeout_s: float,
        confirm_after_s: float = 0.0,
        clock: Callable[[], float] = time.time,
        backlog: Callable[[], int] = lambda: 0,
    ) -> None:
        """``confirm_after_s``: a run must still look stalled this long after it first did (one
        heartbeat period: a Redis that lost its progress records gets them back from the heartbeats).
        ``backlog``: how many messages wait in the broker's queues (`workers.backlog`)."""
        self.engine = engine
        self.backlog = backlog
        self.stall_timeout_s = stall_timeout_s
        self.confirm_after_s = confirm_after_s
        self.clock = clock
        self._noticed: dict[str, float] = {}
        self._strikes: dict[str, tuple[int, float]] = {}  # run id -> (resumes in a row, when the last was)
        self._last_count: int | None = None  # the heartbeat count this process saw last
        self._deferred = 0  # how many runs the last scan took for queued, not stalled
        self._busy_at = 0.0  # when the broker's queues last held messages (as far as a scan asked)

    def check_continuity(self) -> bool:
        """Count this process's heartbeat; whether the count says that Redis lost or went back on
        what it held since the last one (then noted, for the scan, for a stall timeout)."""
        ledger = self.engine.store.ledger
        count = ledger.count_heartbeat()
        went_back = self._last_count is not None and count <= self._last_count
        if went_back:
            log.warning("Redis lost or went back on what it held (heartbeat count %d after %d): resuming running runs now", count, self._last_count)
            ledger.note_l2_loss(self.clock(), self.stall_timeout_s)
        self._last_count = count
        return went_back

    def scan(self) -> list[str]:
        """Resume every running run that has not moved for its stall timeout; returns their ids."""
        self.engine.fire_timeouts()
        now = self.clock()
        ledger = self.engine.store.ledger
        runs = ledger.running_runs()
        progress = ledger.progress_of([run.run_id for run in runs])
        waiting = {wait.run_id for wait in self.engine.store.waits.open([run.run_id for run in runs])}
        lost_at = ledger.l2_loss_noted()
        resumed: list[str] = []
        deferred: list[str] = []
        queued: int | None = None  # messages waiting in the broker, asked once a run looks stalled
        for run in runs:
            if self._past_deadline(run, now) or run.run_id in waiting:
                continue
            changed = run.updated_at.timestamp() if run.updated_at else now
            moved = max(progress.get(run.run_id) or 0.0, changed)
            if lost_at is not None and moved < lost_at:
                if ledger.claim_loss_resume(run.run_id, self.stall_timeout_s):
                    log.warning("run %s has not moved since Redis went back: resuming it from what the tiers hold", run.run_id)
                    if self.engine.rewind(run.run_id, run.epoch):
                        resumed.append(run.run_id)
                continue
            strikes, last_resume = self._strikes.get(run.run_id, (0, 0.0))
            if moved > last_resume + 1.0:  # (the resume itself touches the run's row, on the database's clock)
                strikes = 0  # it moved since it was last resumed
            if now - moved < self.stall_timeout_s * 2**strikes:
                self._noticed.pop(run.run_id, None)
                continue
            if now - self._noticed.setdefault(run.run_id, now) < self.confirm_after_s:
                continue
            if queued is None:
                queued = self._queued()
                if queued:
                    self._busy_at = now
            if queued or now - self._busy_at < self.stall_timeout_s:  # (a message just taken: its step's heartbeat is coming)
                deferred.append(run.run_id)
                continue
            self._noticed.pop(run.run_id, None)
            log.warning("run %s made no progress for %.0f s: resuming it from what the tiers hold", run.run_id, now - moved)
            if self.engine.rewind(run.run_id, run.epoch):
                resumed.append(run.run_id)
                self._strikes[run.run_id] = (strikes + 1, self.clock())
        if deferred and len(deferred) != self._deferred:
            log.info(
                "%d run(s) show no progress for the stall timeout while %d message(s) wait in the broker (or did within it): "
                "a backlog, not a stall", len(deferred), queued,
            )
        self._deferred = len(deferred)
        running = {run.run_id for run in runs}
        self._noticed = {run_id: at for run_id, at in self._noticed.items() if run_id in running}
        self._strikes = {run_id: strike for run_id, strike in self._strikes.items() if run_id in running}
        return resumed

    def _queued(self) -> int:
        """Messages waiting in the broker; one when it cannot say (a broker that does not answer
        takes no resent message either: better to wait than to rewind for nothing)."""
        try:
            return self.backlog()
        except Exception as exc:
            log.warning("cannot count the messages waiting in the broker (%s): taking the runs for queued", type(exc).__name__)
            return 1

    def _past_deadline(self, run: RunRow, now: float) -> bool:
        """A run older than its routine's ``timeout_s`` ends failed, saying so (True: it did)."""
        if run.routine_version is None or run.created_at is None:
            return False
        try:
            timeout_s = self.engine.plans.get(run.routine_name, run.routine_version).routine.timeout_s
        except RoutineError:  # a routine this process cannot compile: the run's own steps say why
            return False
        if timeout_s is None or now - run.created_at.timestamp() < timeout_s:
            return False
        log.warning("run %s timed out after %g s", run.run_id, timeout_s)
        self.engine.lifecycle.fail(run.run_id, run.routine_name, run.routine_version, {}, f"the run timed out after {timeout_s:g} s")
        return True
