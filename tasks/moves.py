"""The reads and writes of walking a run's plan (`tasks.advance.Moves`): a sub-routine's child
context created, a gate's condition decided (and its skip committed), a fan-out's items counted
and their contexts created, an item's end counted, a wait armed."""

from __future__ import annotations

import logging
import time
from typing import Any

from state.errors import InvalidValue, LimitExceeded, LineageLost, StepFailed, VersionConflict
from state.keys import context_id
from state.metrics import metrics
from state.models import ExportDeclaration, RunContext
from state.store import TieredStore
from tasks.advance import ItemEnd
from tasks.changes import ContextView
from tasks.events import ancestors, event_of
from tasks.expressions import ExpressionFailed
from tasks.plan import Node, Plan, concrete
from tasks.steps import StepExecutor

log = logging.getLogger(__name__)


class FanOutFailed(StepFailed):
    """More items of a fan-out failed than it tolerates: its run fails."""


def fan_out_key(step_id: str, epoch: int) -> str:
    """A fan-out's record in L2: one per epoch, so a rebuilt run counts afresh."""
    return f"{step_id}@{epoch}"


class PlanMoves:
    """The moves of one run at one epoch. Owns nothing: state is in the store.

    Promises: each move can be made again (a message delivered twice walks twice): a child or item
    context is created once, a skip commits once, an item's end is counted once.
    """

    def __init__(
        self, store: TieredStore, executor: StepExecutor, plan: Plan, run_id: str, epoch: int, *, max_items: int
    ) -> None:
        self.store = store
        self.executor = executor  # commits a gate's skip like a step
        self.plan = plan
        self.run_id = run_id
        self.epoch = epoch
        self.max_items = max_items
        self.waiting: list[str] = []  # the events of the waits these moves armed and left waiting

    def context(self, path: str, versions: dict[str, int]) -> RunContext:
        return self.store.read_for_step(context_id(self.run_id, path), epoch=self.epoch, at_least=versions.get(path, 1))

    # ---- sub-routines -------------------------------------------------------------------------

    def create_child(self, node: Node, parent: RunContext, items: tuple[int, ...]) -> RunContext:
        assert node.child_context is not None
        path = concrete(node.child_context, items)
        child = parent.create_child(
            self.plan.contexts[node.child_context], inherit=node.inherit, context_id=context_id(self.run_id, path)
        )
        for name, spec in node.initial.items():
            if name in child.variables:
                continue
            if spec.required:  # declared without a value: only inheriting it can give it one
                raise InvalidValue(f"sub-routine {node.step_id!r}: variables.{name} has no value: inherit it")
            child.set_variable(name, spec.value, sensitivity=spec.sensitivity)
        child.exports = [ExportDeclaration(**spec.model_dump()) for spec in node.exports]  # merged up with the child
        return self._create(child, parent)

    def _create(self, child: RunContext, parent: RunContext) -> RunContext:
        child.epoch = parent.epoch
        try:
            created = self.store.create_context(child)
            self.store.ledger.count_l3_write(self.run_id)
            return created
        except VersionConflict:  # created by an earlier delivery of this message
            return self.store.read_for_step(child.context_id, epoch=parent.epoch, at_least=1)

    # ---- conditions -----------------------------------------------------------------------------

    def decide(self, node: Node, ctx: RunContext, items: tuple[int, ...]) -> RunContext | None:
        """Evaluate a gate on what its step could read; if false, commit the skip and record the
        skipped steps (with the expression's value)."""
        assert node.condition is not None
        view = ContextView(ctx, node.reads, open_value=self.store.blobs.open)
        names = [name for name in node.condition.variables if name in view]
        try:
            if node.condition.evaluate({name: view.get(name) for name in names}):
                return None
        except ExpressionFailed as exc:
            raise ExpressionFailed(f"step {concrete(node.step_id.removesuffix('?'), items)!r}: {exc}") from None
        commit = self.executor.commit_mark(ctx, concrete(node.step_id, items))
        if commit.applied:
            self._record_skips(node, items, f"when {node.condition.source!r} was false")
        return commit.context

    def _record_skips(self, node: Node, items: tuple[int, ...], reason: str) -> None:
        now = time.time()
        metrics().steps.labels(self.plan.routine.name, "skipped").inc(len(node.skips))
        for step_id in node.skips:
            record = {"status": "skipped", "worker": "-", "duration_s": 0.0, "finished_at": now, "reason": reason}
            self.store.ledger.record_step(self.run_id, concrete(step_id, items), record, epoch=self.epoch)

    # ---- fan-outs -------------------------------------------------------------------------------

    def start_fan_out(self, node: Node, parent: RunContext, items: tuple[int, ...]) -> int:
        """Count the items and create every item's context at once (one L3 statement, one pipeline
        to L2): an item that starts later only reads its own."""
        listed = self._items_list(node, parent)
        assert node.fan_out is not None and node.items_context is not None
        alias, level = node.fan_out.as_, parent.sensitivity_of(node.fan_out.for_each)
        contexts = []
        for index, value in enumerate(listed):
            path = concrete(node.items_context, (*items, index))
            item = parent.create_child(parent.routine_id, inherit=node.inherit, context_id=context_id(self.run_id, path))
            item.set_variable(alias, value, sensitivity=level)
            item.inherited[alias] = item.variables[alias]  # the item itself is not a change to merge back
            item.epoch = parent.epoch
            contexts.append(item)
        if contexts:
            self.store.create_contexts(contexts)
            self.store.ledger.count_l3_write(self.run_id)
        self.store.ledger.start_fan_out(self.run_id, fan_out_key(concrete(node.step_id, items), self.epoch), len(listed))
        return len(listed)

    def _items_list(self, node: Node, parent: RunContext) -> list[Any]:
        assert node.fan_out is not None
        name = node.fan_out.for_each
        if name not in parent.variables:
            raise StepFailed(f"fan-out {node.step_id.removesuffix(':start')!r}: for_each {name!r} is not a variable of the context")
        listed = self.store.blobs.open(parent.variables[name])  # (a long list is held by reference)
        if not isinstance(listed, list):
            raise StepFailed(
                f"fan-out {node.step_id.removesuffix(':start')!r}: for_each {name!r} holds a {type(listed).__name__}, not a list"
            )
        if len(listed) > self.max_items:
            raise LimitExceeded(node.step_id.removesuffix(":start"), "max_items (RUNCTX_MAX_ITEMS)", len(listed), self.max_items)
        return listed

    def start_item(self, node: Node, index: int, items: tuple[int, ...]) -> RunContext:
        """Item ``index``'s context (created with the fan-out's: see `start_fan_out`)."""
        assert node.items_context is not None
        path = concrete(node.items_context, (*items, index))
        return self.store.read_for_step(context_id(self.run_id, path), epoch=self.epoch, at_least=1)

    def end_item(self, node: Node, item: RunContext, items: tuple[int, ...]) -> ItemEnd:
        assert node.fan_out is not None and node.items_context is not None
        failed = item.has_applied(concrete(f"{node.items_context}!", items))
        key = fan_out_key(concrete(node.step_id, items[:-1]), self.epoch)
        rank, total, failures = self.store.ledger.end_item(self.run_id, key, items[-1], failed)
        if rank == 0:
            raise LineageLost(self.run_id, f"the count of fan-out {node.step_id!r} is lost")
        tolerated = node.fan_out.tolerated(total)
        if failures > tolerated:
            fan_out = concrete(node.step_id.removesuffix(":start"), items[:-1])
            raise FanOutFailed(f"fan-out {fan_out!r}: {failures} of {total} items failed, more than the {tolerated} tolerated")
        return ItemEnd(rank, total)


    # ---- waits ----------------------------------------------------------------------------------

    def wait_over(self, node: Node, ctx: RunContext, items: tuple[int, ...]) -> bool:
        """Arm the wait in L3 (a signal kept for it ends it at once). A wait that goes on is recorded
        (the step's record and the run's history say which event) and the contexts it stands on are
        written to L3 first, so that the run, resting, depends on nothing Redis holds."""
        assert node.wait is not None
        step_id = concrete(node.step_id, items)
        if ctx.has_applied(step_id):
            return True
        event = event_of(node, ctx)
        wait = self.store.waits.arm(self.run_id, step_id, event, node=node.index, items=items, timeout_s=node.wait.timeout_s)
        if wait.resolution is not None:
            return True
        metrics().waits.labels(self.plan.routine.name, "armed").inc()
        self.waiting.append(event)
        record = {"status": "waiting", "worker": "-", "duration_s": 0.0, "finished_at": time.time(), "reason": f"event {event!r}"}
        self.store.ledger.record_step(self.run_id, step_id, record, epoch=self.epoch)
        path = concrete(node.context, items)
        self.store.write_behind.flush([context_id(self.run_id, p) for p in ancestors(path)])
        log.info("run %s: step %s waits for event %r", self.run_id, step_id, event)
        return False
