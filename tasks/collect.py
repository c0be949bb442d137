"""A fan-out's items brought back into its context: the collected variable in item order, the
failed items listed, everything else an item changed merged under the fan-out's strategies."""

from __future__ import annotations

from state.errors import StepFailed
from state.models import RunContext
from state.sensitivity import DataSensitivity
from tasks.routine import ForEachStep, MergeSpec


def collect_items(working: RunContext, items: list[RunContext], fan_out: ForEachStep, merge: MergeSpec, *, failure: str) -> None:
    """Apply the items (in item order) to ``working``, the fan-out's context.

    ``collect.into`` gets each item's ``collect.from`` (None for an item that failed or never set
    it); ``failures_into`` the failed items' ``{item, step, type, error}``; every other variable an
    item added or changed merges as a sub-routine's would. Raises StepFailed when more items failed
    than the fan-out tolerates.
    """
    collected: list[object] = []
    failures: list[dict[str, object]] = []
    level = DataSensitivity.PUBLIC
    source = fan_out.collect.from_ if fan_out.collect is not None else None
    own = {fan_out.as_, failure} | ({source} if source else set())
    for index, item in enumerate(items):
        failed = item.variables.get(failure)
        if failed is not None:
            failures.append({"item": index, **failed})
        if source is not None:
            collected.append(None if failed is not None else item.variables.get(source))
            if source in item.variables:
                level = DataSensitivity.highest(level, item.sensitivity_of(source))
        if not item.child_changes().keys() - own:
            continue  # it changed nothing but what is collected: nothing to merge
        brought = item.working_copy()
        for name in own & brought.variables.keys():
            brought.delete_variable(name)
        working.merge_child(brought, default=merge.default, per_variable=merge.variables)
    tolerated = fan_out.tolerated(len(items))
    if len(failures) > tolerated:
        raise StepFailed(f"{len(failures)} of {len(items)} items failed, more than the {tolerated} tolerated")
    if fan_out.collect is not None:
        working.set_variable(fan_out.collect.into, collected, sensitivity=level)
    if fan_out.failures_into is not None:
        working.set_variable(fan_out.failures_into, failures, sensitivity=level)
