"""Walking the plan: which real steps follow a node (or that the run is finished).

Virtual nodes are resolved here by whichever worker finished the node before them: a fork
starts every branch, a join goes on once each branch end is in its context's ``applied_steps``
(committed with the step, so the count is durable and no task waits for it), a child start
creates the child context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from state.models import RunContext
from tasks.plan import REAL_KINDS, Node, Plan


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
    if node.kind in REAL_KINDS:
        return [Next(index, dict(versions))]
    if node.kind == "finish":
        return [Next(None, dict(versions))]
    if node.kind == "join" and node.context not in contexts:  # resumed here: nothing just committed
        return []
    if node.kind == "fork":
        work: list[Next] = []
        for start in node.branch_starts:
            work += next_work(plan, start, versions, contexts, create_child)
        return work
    if node.kind == "join":
        ctx = contexts[node.context]  # the branch end that just committed did so in this context
        if not plan.is_done(index, ctx.has_applied):
            return []
        return next_work(plan, node.next, versions, contexts, create_child)
    # child_start
    assert node.child_context is not None
    child = create_child(node, contexts[node.context])
    contexts = {**contexts, node.child_context: child}
    versions = {**versions, node.child_context: child.version}
    return next_work(plan, node.next, versions, contexts, create_child)


@dataclass(frozen=True)
class Resume:
    """Where a rebuilt run goes on: the nodes to start from, and the contexts it no longer reaches."""

    points: list[int]  # real nodes not yet applied, child starts whose child is not there, the finish
    orphans: list[str]  # paths of child contexts whose start the rebuilt parent has not reached


def resume_points(plan: Plan, contexts: dict[str, RunContext]) -> Resume:
    """Walk the plan over the applied steps of each context (by path) and find where the run stands.

    A real node goes on if applied; a join only once every branch end is applied; a child start
    only into a child context that exists (its end, if applied in the parent, skips the child).
    Each point is handed to `next_work` to dispatch, as if the node before it had just committed.
    """
    applied = {path: set(ctx.applied_steps) for path, ctx in contexts.items()}
    ends = {node.child_context: node for node in plan.nodes if node.kind == "child_end"}
    points: list[int] = []
    reached: set[str] = {""}
    seen: set[int] = set()

    def walk(index: int | None) -> None:
        if index is None or index in seen:
            return
        seen.add(index)
        node = plan.node(index)
        if node.kind in REAL_KINDS:
            if node.step_id in applied.get(node.context, set()):
                walk(node.next)
            else:
                points.append(index)
        elif node.kind == "fork":
            for start in node.branch_starts:
                walk(start)
        elif node.kind == "join":
            if plan.is_done(index, applied.get(node.context, set())):
                walk(node.next)
        elif node.kind == "child_start":
            assert node.child_context is not None
            end = ends[node.child_context]
            if end.step_id in applied.get(node.context, set()):
                walk(end.next)  # merged already: the child's own state no longer matters
            elif node.child_context in contexts:
                reached.add(node.child_context)
                walk(node.next)
            else:
                points.append(index)  # the child is created when this point is dispatched
        else:  # finish
            points.append(index)

    walk(plan.start)
    orphans = {path for path in contexts if path not in reached and not _merged(plan, path, applied, ends)}
    # A child's path starts with its parent's: every descendant of an orphan is one too.
    orphans |= {path for path in contexts if any(path.startswith(f"{orphan}/") for orphan in orphans)}
    return Resume(points=points, orphans=sorted(orphans))


def _merged(plan: Plan, path: str, applied: dict[str, set[str]], ends: dict[str | None, Node]) -> bool:
    """Whether a child context was merged back already (then it is history, not an orphan)."""
    end = ends.get(path)
    return end is not None and end.step_id in applied.get(end.context, set())
