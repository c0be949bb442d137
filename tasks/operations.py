"""Operations on a run that has ended: resume it where it stopped, or fork it from one of its steps
into a new run. Both go on the way a rewind does (`RunLifecycle.go_on`): the plan says which steps
follow the ones the contexts hold."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from state.errors import InvalidValue, NotFound
from state.fork import contexts_before, step_entry
from state.limits import check_name
from state.store import TieredStore
from state.tiers.data import FINAL_STATUSES, RunRow
from tasks.lifecycle import RunLifecycle

log = logging.getLogger(__name__)


class RunOperations:
    """Resume and fork. Owns nothing but its collaborators; promises that a refused operation (an
    unknown run, a run in the wrong state, a step that never applied) changes nothing stored."""

    def __init__(self, store: TieredStore, lifecycle: RunLifecycle) -> None:
        self.store = store
        self.lifecycle = lifecycle

    def resume(self, run_id: str, variables: Mapping[str, Any] | None = None) -> bool:
        """Go on with a failed or cancelled run where it stopped, in a new epoch: every applied step
        stays applied, the steps after them (the failed one first) run. ``variables`` are set in the
        root context first (an edit, in the run's history), with the sensitivity declared for them.
        False if the run is running (nothing to do); InvalidValue if it succeeded."""
        run = self.store.ledger.get_run(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} does not exist")
        if run.status == "succeeded":
            raise InvalidValue(f"run {run_id} succeeded: only a failed or cancelled run can be resumed")
        if run.status not in FINAL_STATUSES:
            return False
        for name in variables or {}:
            check_name(name)
        if variables:
            with self.store.edit(run_id) as working:
                for name, value in variables.items():
                    working.set_variable(name, value)
        reopened = self.store.ledger.reopen(run_id)
        if reopened is None:  # resumed by someone else meanwhile
            return False
        log.info("run %s resumed (it was %s)", run_id, run.status)
        note = f"was {run.status}" + (f"; set {', '.join(sorted(variables))}" if variables else "")
        self.store.history.event(run_id, run_id, "resumed", note=note, epoch=reopened.epoch)
        self.store.ledger.touch_progress([run_id], time.time())
        return self.lifecycle.rewind(run_id, reopened.epoch)

    def fork(self, run_id: str, from_step: str, variables: Mapping[str, Any] | None = None) -> str:
        """A new run of the same routine version whose contexts are ``run_id``'s as they were just
        before ``from_step`` was applied (rebuilt from its history), going on from there with
        ``variables`` set in its root first. Returns the new run's id; the origin is left as it is."""
        origin = self.store.ledger.get_run(run_id)
        if origin is None:
            raise NotFound(f"run {run_id!r} does not exist")
        if origin.routine_version is None:
            raise NotFound(f"run {run_id!r} has no routine version")
        for name in variables or {}:
            check_name(name)
        entries = self.store.history.of_run(run_id, context_ids=[run_id])
        target = step_entry(entries, from_step)
        new_id = uuid.uuid4().hex
        snapshots = self.store.l3_contexts(run_id)
        contexts = contexts_before(entries, target, snapshots, run_id=new_id, codec=self.store.codec)
        root = next((ctx for ctx in contexts if ctx.context_id == new_id), None)
        if root is None:
            raise InvalidValue(f"--from {from_step!r}: the run's root context is not in its history")
        for name, value in (variables or {}).items():
            root.set_variable(name, value)
        run = RunRow(
            run_id=new_id, routine_name=origin.routine_name, routine_version=origin.routine_version, root_context_id=new_id,
            status="running", meta={"forked_from": run_id, "from_step": from_step},
        )
        self.store.blobs.hold(new_id, contexts)  # the values it shares with its origin, by reference
        root = self.store.create_context(root, run=run)
        others = [ctx for ctx in contexts if ctx.context_id != new_id]
        if others:
            self.store.create_contexts(others)
        note = f"forked from run {run_id} just before step {from_step}"
        self.store.history.event(new_id, new_id, "forked", note=note, step_id=from_step)
        log.info("run %s: %s", new_id, note)
        self.lifecycle.go_on(run, [root, *others], epoch=1)
        return new_id
