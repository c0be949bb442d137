"""The contexts of a fork: a run's contexts as they were just before one of its steps was applied,
rebuilt from its history (`state.history`) under a new run id. Nothing runs, nothing is stored
here; `tasks.lifecycle.RunLifecycle.fork` stores them and goes on from there."""

from __future__ import annotations

from collections.abc import Sequence

from state.codec import Codec
from state.errors import InvalidValue
from state.history import CREATED, HistoryEntry, lineage, open_change
from state.models import RunContext


def step_entry(entries: Sequence[HistoryEntry], step_id: str) -> HistoryEntry:
    """The commit that applied ``step_id`` (of the newest epoch); InvalidValue if none did."""
    made = [entry for entry in entries if entry.step_id == step_id and entry.made_version and entry.kind != CREATED]
    if not made:
        raise InvalidValue(f"--from {step_id!r}: no commit of that step is in the run's history (a step it applied)")
    return max(made, key=lambda entry: (entry.epoch, entry.version))


def contexts_before(
    entries: Sequence[HistoryEntry], target: HistoryEntry, snapshots: Sequence[RunContext], *, run_id: str, codec: Codec
) -> list[RunContext]:
    """Each context of the run as it was just before ``target`` was committed, as a new context of
    run ``run_id`` (version 0, epoch 1, ready to be created): the target's own context at the version
    before it; any other at its newest version committed before the target; a context created
    after it is left out. ``snapshots``: the origin's contexts (what is not in the history: parent,
    depth, limits, exports)."""
    origin = target.run_id
    made = [entry for entry in entries if entry.made_version]
    forked = []
    for snapshot in snapshots:
        mine = [entry for entry in made if entry.context_id == snapshot.context_id]
        if snapshot.context_id == target.context_id:
            before = [entry for entry in mine if entry.version == target.previous and entry.epoch <= target.epoch]
        else:
            before = [entry for entry in mine if entry.at < target.at]
        if not before:
            continue  # created after the step: the fork creates it when it gets there
        last = max(before, key=lambda entry: (entry.epoch, entry.version))
        forked.append(_rebuilt(snapshot, lineage(entries, last), origin=origin, run_id=run_id, codec=codec))
    return forked


def _rebuilt(snapshot: RunContext, chain: list[HistoryEntry], *, origin: str, run_id: str, codec: Codec) -> RunContext:
    def renamed(context_id: str | None) -> str | None:
        return None if context_id is None else run_id + context_id.removeprefix(origin)

    ctx = RunContext(
        context_id=renamed(snapshot.context_id) or run_id, run_id=run_id, routine_id=snapshot.routine_id,
        parent_id=renamed(snapshot.parent_id), depth=snapshot.depth, limits=snapshot.limits, exports=list(snapshot.exports),
    )
    applied: list[str] = []
    for entry in chain:
        for change in entry.changes:
            if change.op == "delete":
                ctx.delete_variable(change.name)
            else:
                value = open_change(change, entry, codec)
                ctx.set_variable(change.name, value, sensitivity=change.sensitivity, scope=change.scope, written_at=entry.at)  # type: ignore[arg-type]
                if entry.kind == CREATED and snapshot.parent_id is not None:
                    ctx.inherited[change.name] = value  # what a child started with: merge-back compares with it
        if entry.step_id:
            applied.append(entry.step_id)
    for step_id in applied:
        ctx.mark_applied(step_id)
    ctx.inherited = {name: value for name, value in ctx.inherited.items() if name in snapshot.inherited}
    return ctx
