"""The watchdog for stalled work: a running run that shows no progress for the stall timeout is
resumed from what the tiers hold (a rewind), whatever stopped it. It also ends the waits whose
deadline passed (`tasks.waiting`), and leaves alone a run that waits for an event: it rests.

What it covers: a step taken by a node that died (its message waits in the Redis transport's
unacked set until the visibility timeout), a broker that lost its messages, a Redis that came back
empty, a finalize that never ran. Progress is a step finishing, or a running step's process saying
it is alive (`ProcessRuntime` touches the run's progress while it runs a step), so a long step is
not mistaken for a stall. Runs come from L3 (`runs`), which survives anything that happens to Redis.

One process scans at a time (the holder of a lease in Redis). A run's last move is the newest of
its progress record in Redis and its row's last change in L3 (creation, rewind), so a Redis that
came back empty makes a long-running run look stalled at once, as it should. A run resumed once and
still not moving waits twice as long before the next resume, so a run whose steps only wait in a
long queue is not resumed again and again.
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
    ) -> None:
        """``confirm_after_s``: a run must still look stalled this long after it first did (one
        heartbeat period: a Redis that lost its progress records gets them back from the heartbeats)."""
        self.engine = engine
        self.stall_timeout_s = stall_timeout_s
        self.confirm_after_s = confirm_after_s
        self.clock = clock
        self._noticed: dict[str, float] = {}
        self._strikes: dict[str, tuple[int, float]] = {}  # run id -> (resumes in a row, when the last was)

    def scan(self) -> list[str]:
        """Resume every running run that has not moved for its stall timeout; returns their ids."""
        self.engine.fire_timeouts()
        now = self.clock()
        ledger = self.engine.store.ledger
        runs = ledger.running_runs()
        progress = ledger.progress_of([run.run_id for run in runs])
        waiting = {wait.run_id for wait in self.engine.store.waits.open([run.run_id for run in runs])}
        resumed = []
        for run in runs:
            if self._past_deadline(run, now) or run.run_id in waiting:
                continue
            changed = run.updated_at.timestamp() if run.updated_at else now
            moved = max(progress.get(run.run_id) or 0.0, changed)
            strikes, last_resume = self._strikes.get(run.run_id, (0, 0.0))
            if moved > last_resume + 1.0:  # (the resume itself touches the run's row, on the database's clock)
                strikes = 0  # it moved since it was last resumed
            if now - moved < self.stall_timeout_s * 2**strikes:
                self._noticed.pop(run.run_id, None)
                continue
            if now - self._noticed.setdefault(run.run_id, now) < self.confirm_after_s:
                continue
            self._noticed.pop(run.run_id, None)
            log.warning("run %s made no progress for %.0f s: resuming it from what the tiers hold", run.run_id, now - moved)
            if self.engine.rewind(run.run_id, run.epoch):
                resumed.append(run.run_id)
                self._strikes[run.run_id] = (strikes + 1, self.clock())
        running = {run.run_id for run in runs}
        self._noticed = {run_id: at for run_id, at in self._noticed.items() if run_id in running}
        self._strikes = {run_id: strike for run_id, strike in self._strikes.items() if run_id in running}
        return resumed

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
