"""Steps that wait for the outside world (`wait_for`), and the signals and deadlines that end the
waits.

A run reaching a wait step arms the wait in L3 (`state.waits`) and sends nothing: no message sits
in the broker, no worker holds the run, and a Redis or a worker lost meanwhile loses nothing (the
run's contexts are written to L3 before it rests). What ends the wait sends the wait step's message
(a signal, by `RunWaits.signal`; a deadline, by `RunWaits.fire_timeouts`, which the watchdog calls);
the step then puts the signal's payload in its variable (`tasks.steps.StepExecutor`). A rebuilt or
resumed run that reaches the step again finds its wait as L3 holds it: resolved, it goes on at once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from state.errors import InvalidValue, LimitExceeded, NotFound, RunEnded
from state.limits import canonical_json
from state.models import DataSensitivity
from state.store import TieredStore
from state.tiers.data import FINAL_STATUSES, SignalReceipt, WaitRow
from tasks.advance import Next
from tasks.events import waits_for
from tasks.lifecycle import RunLifecycle
from tasks.plan import Plan, concrete
from tasks.plans import PlanCache
from tasks.routine import EVENT_NAME

log = logging.getLogger(__name__)


class RunWaits:
    """Signals and deadlines. Owns nothing but its collaborators; promises that a signal refused
    (unknown run or event, a run that ended, an event sent before) stores nothing, and that a wait
    ends once: a deadline fires once whoever scans, a signal is consumed by one step."""

    def __init__(self, store: TieredStore, plans: PlanCache, lifecycle: RunLifecycle, *, max_value_bytes: int) -> None:
        self.store = store
        self.plans = plans
        self.lifecycle = lifecycle
        self.max_value_bytes = max_value_bytes

    def signal(self, run_id: str, event: str, payload: Any = None) -> SignalReceipt:
        """Send ``event`` to a run with ``payload`` (sealed first if the variable it goes into is
        confidential or secret): the step waiting for it goes on; if none waits yet, it is kept for
        the step that will."""
        run = self.store.ledger.get_run(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} does not exist")
        if run.status in FINAL_STATUSES or run.routine_version is None:
            raise RunEnded(f"run {run_id} has ended ({run.status}): it waits for no event")
        if not isinstance(event, str) or not re.fullmatch(EVENT_NAME, event):
            raise InvalidValue(f"event {str(event)[:80]!r}: letters, digits, '_', '.', ':' and '-', at most 200 characters")
        plan = self.plans.get(run.routine_name, run.routine_version)
        nodes = waits_for(plan, event)
        if not nodes:
            known = sorted({node.wait.event for node in plan.nodes if node.kind == "wait" and node.wait})
            raise InvalidValue(
                f"run {run_id}: routine {run.routine_name!r} waits for no event {event!r}"
                + (f" (it waits for: {', '.join(known)})" if known else " (it has no wait_for step)")
            )
        if isinstance(payload, Mapping):
            payload = dict(payload)
        size = len(canonical_json(payload).encode())
        into = nodes[0].wait.into  # type: ignore[union-attr]
        if size > self.max_value_bytes:
            raise LimitExceeded(into, "max_value_bytes (RUNCTX_MAX_VALUE_BYTES)", size, self.max_value_bytes)
        level = DataSensitivity.highest(*(node.sensitivity for node in nodes))
        receipt = self.store.waits.signal(run_id, event, payload, level.value)
        self.store.history.event(run_id, run_id, "signalled", note=f"event {event!r}", epoch=run.epoch)
        if receipt.wait is not None:
            log.info("run %s: event %r delivered to step %s", run_id, event, receipt.wait.step_id)
            self._go_on(plan, receipt.wait, run.routine_name, run.routine_version, run.epoch)
        else:
            log.info("run %s: event %r kept until a step waits for it", run_id, event)
        return receipt

    def fire_timeouts(self, *, limit: int = 100) -> list[WaitRow]:
        """End every wait whose deadline passed (each once, however many processes scan): its step
        goes on, failing its run or with its variable null, as its ``on_timeout`` says."""
        fired = self.store.waits.expire(limit=limit)
        for wait in fired:
            run = self.store.ledger.get_run(wait.run_id)
            if run is None or run.status in FINAL_STATUSES or run.routine_version is None:
                continue
            log.warning("run %s: step %s timed out waiting for event %r", wait.run_id, wait.step_id, wait.event)
            self.store.history.event(
                wait.run_id, wait.run_id, "timed_out", step_id=wait.step_id, note=f"no event {wait.event!r} before its deadline",
                epoch=run.epoch,
            )
            self._go_on(self.plans.get(run.routine_name, run.routine_version), wait, run.routine_name, run.routine_version, run.epoch)
        return fired

    def _go_on(self, plan: Plan, wait: WaitRow, routine: str, version: int, epoch: int) -> None:
        """Send the step of a wait that ended. Should this message be lost (or be of an epoch a
        rewind left behind), the run's rebuild reaches the step again and finds its wait ended."""
        self.store.ledger.touch_progress([wait.run_id], self.store.clock())
        path = concrete(plan.node(wait.node).context, wait.items)
        self.lifecycle.send(plan, wait.run_id, routine, version, [Next(wait.node, {path: 1}, wait.items)], epoch)
