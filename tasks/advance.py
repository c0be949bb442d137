"""Walking the plan: which real steps follow a node (or that the run is finished).

Virtual nodes are resolved here by whichever worker finished the node before them: a fork
starts every branch, a join goes on once each branch end is in its context's ``applied_steps``
(committed with the step, so the count is durable and no task waits for it), a child start
creates the child context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from state.models import RunContext
from tasks.plan import Node, Plan


@dataclass(frozen=True)
class Next:
    """A piece of work to dispatch: a real node, or (``node`` None) the run's finalize."""

    node: int | None
    versions: dict[str, int]  # the version each context must at least have for it


CreateChild = Callable[[Node, RunContext], RunContext]


def next_work(
    plan: Plan,
    index: int | None,
    versions: dict[str, int],
    contexts: dict[str, RunContext],
    create_child: CreateChild,
) -> list[Next]:
    """The work that follows node ``index``, given the contexts just committed (by path)."""
    if index is None:
        return []
    node = plan.node(index)
    if node.kind in ("action", "child_end"):
        return [Next(index, dict(versions))]
    if node.kind == "finish":
        return [Next(None, dict(versions))]
    if node.kind == "fork":
        work: list[Next] = []
        for start in node.branch_starts:
            work += next_work(plan, start, versions, contexts, create_child)
        return work
    if node.kind == "join":
        ctx = contexts[node.context]  # the branch end that just committed did so in this context
        if not plan.is_done(index, set(ctx.applied_steps)):
            return []
        return next_work(plan, node.next, versions, contexts, create_child)
    # child_start
    assert node.child_context is not None
    child = create_child(node, contexts[node.context])
    contexts = {**contexts, node.child_context: child}
    versions = {**versions, node.child_context: child.version}
    return next_work(plan, node.next, versions, contexts, create_child)
