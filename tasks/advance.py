"""Walking the plan: which real steps follow a node (or that the run is finished).

A wait step is sent only once its wait has ended (`Moves.wait_over`). Virtual nodes are resolved
here by whichever worker finished the node before them: a fork
starts every branch, a join goes on once each branch end is in its context's ``applied_steps``
(committed with the step, so the count is durable and no task waits for it), a child start
creates the child context, a gate evaluates its condition (and commits the skip when false), a
fan-out starts its first items and an item's end starts the next one (and the collect after the
last). What needs the tiers is done by `Moves`, which the lifecycle implements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from state.blobs import list_length
from state.models import RunContext
from tasks.plan import REAL_KINDS, Node, Plan, concrete


@dataclass(frozen=True)
class Next:
    """A piece of work to dispatch: a real node, or (``node`` None) the run's finalize."""

    node: int | None
    versions: dict[str, int]  # the version each context (by concrete path) must at least have for it
    items: tuple[int, ...] = ()  # the item indices of the fan-outs it is inside, outermost first


@dataclass(frozen=True)
class ItemEnd:
    """An item's end as counted in L2: ``rank`` (1 for the first item to end), of ``total``."""

    rank: int
    total: int


class Moves(Protocol):
    """The reads and writes of walking the plan (`tasks.lifecycle.RunLifecycle` does them)."""

    def context(self, path: str, versions: dict[str, int]) -> RunContext: ...

    def create_child(self, node: Node, parent: RunContext, items: tuple[int, ...]) -> RunContext: ...

    def decide(self, node: Node, ctx: RunContext, items: tuple[int, ...]) -> RunContext | None:
        """A gate's condition on ``ctx``: None when true, else the context after its skip's commit."""

    def start_fan_out(self, node: Node, parent: RunContext, items: tuple[int, ...]) -> int:
        """Count the fan-out's items (recorded for its item ends); how many there are."""

    def start_item(self, node: Node, index: int, items: tuple[int, ...]) -> RunContext:
        """Create (or find) item ``index``'s context."""

    def end_item(self, node: Node, item: RunContext, items: tuple[int, ...]) -> ItemEnd: ...

    def wait_over(self, node: Node, ctx: RunContext, items: tuple[int, ...]) -> bool:
        """Arm a wait step's wait (once); whether it has ended already (signalled, or timed out)."""


def next_work(
    plan: Plan, index: int | None, versions: dict[str, int], contexts: dict[str, RunContext], moves: Moves,
    items: tuple[int, ...] = (),
) -> list[Next]:
    """The work that follows node ``index``, given the contexts just committed (by concrete path)."""
    if index is None:
        return []
    node = plan.node(index)
    path = concrete(node.context, items)
    if node.kind == "wait":  # sent once its wait ended: until then the run rests, holding no message
        ctx = contexts.get(path) or moves.context(path, versions)
        return [Next(index, dict(versions), items)] if moves.wait_over(node, ctx, items) else []
    if node.kind in REAL_KINDS:
        return [Next(index, dict(versions), items)]
    if node.kind == "finish":
        return [Next(None, dict(versions))]
    if node.kind == "join" and path not in contexts:  # resumed here: nothing just committed
        return []
    if node.kind == "fork":
        work: list[Next] = []
        for start in node.branch_starts:
            work += next_work(plan, start, versions, contexts, moves, items)
        return work
    if node.kind == "join":
        if not plan.is_done(index, contexts[path].has_applied, items):
            return []
        return next_work(plan, node.next, versions, contexts, moves, items)
    ctx = contexts.get(path) or moves.context(path, versions)
    if node.kind == "gate":
        skipped = None if ctx.has_applied(concrete(node.step_id, items)) else moves.decide(node, ctx, items)
        if skipped is None and not ctx.has_applied(concrete(node.step_id, items)):
            return next_work(plan, node.next, versions, contexts, moves, items)
        if skipped is not None:
            contexts, versions = {**contexts, path: skipped}, {**versions, path: skipped.version}
        return next_work(plan, node.after, versions, contexts, moves, items)
    if node.kind == "child_start":
        assert node.child_context is not None
        child = moves.create_child(node, ctx, items)
        child_path = concrete(node.child_context, items)
        return next_work(
            plan, node.next, {**versions, child_path: child.version}, {**contexts, child_path: child}, moves, items
        )
    if node.kind == "fan_out":
        total = moves.start_fan_out(node, ctx, items)
        if total == 0:
            return next_work(plan, node.collect, versions, contexts, moves, items)
        assert node.fan_out is not None
        work = []
        for number in range(min(total, node.fan_out.max_concurrency)):
            work += start_item(plan, node, number, versions, contexts, moves, items)
        return work
    # item_end: ``items`` ends with the item's own index
    owner = plan.node(node.owner)  # type: ignore[arg-type]
    assert owner.fan_out is not None
    end = moves.end_item(owner, ctx, items)
    outer = items[:-1]
    work = []
    following = owner.fan_out.max_concurrency + end.rank - 1
    if following < end.total:
        work += start_item(plan, owner, following, versions, contexts, moves, outer)
    if end.rank == end.total:
        siblings = concrete(owner.items_context or "", outer)[: -len("[]")] + "["
        around = {key: version for key, version in versions.items() if not key.startswith(siblings)}
        work += next_work(plan, owner.collect, around, contexts, moves, outer)
    return work


def start_item(
    plan: Plan, fan_out: Node, number: int, versions: dict[str, int], contexts: dict[str, RunContext], moves: Moves,
    items: tuple[int, ...],
) -> list[Next]:
    item = moves.start_item(fan_out, number, items)
    inner = (*items, number)
    path = concrete(fan_out.items_context or "", inner)
    # An item's messages need its own context and those around the fan-out, not its siblings'
    # (which would make each message longer than the one before, item after item).
    siblings = concrete(fan_out.items_context or "", items)[: -len("[]")] + "["
    versions = {key: version for key, version in versions.items() if not key.startswith(siblings)}
    return next_work(plan, fan_out.item_start, {**versions, path: item.version}, {**contexts, path: item}, moves, inner)


@dataclass(frozen=True)
class FanOutSeed:
    """A fan-out's item ends as a rebuilt run's contexts show them (its L2 count is set to these)."""

    node: int
    items: tuple[int, ...]  # where the fan-out is (its enclosing items)
    total: int
    ended: dict[int, bool]  # item index -> whether it failed


@dataclass
class Resume:
    """Where a rebuilt run goes on: the nodes to start from, and the contexts it no longer reaches."""

    points: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (node, items)
    orphans: list[str] = field(default_factory=list)  # concrete paths of contexts no longer reached
    fan_outs: list[FanOutSeed] = field(default_factory=list)
    start_items: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)  # (fan_out, index, items)


def resume_points(plan: Plan, contexts: dict[str, RunContext]) -> Resume:
    """Walk the plan over the applied steps of each context (by concrete path) and find where the
    run stands.

    A real node goes on if applied; a join only once every branch end is applied; a child start
    only into a child context that exists (its end, if applied in the parent, skips the child); a
    gate past its step if skipped, into it if the step started, else it is decided again; a
    fan-out's items are walked one by one (those ended are counted, those started go on, those
    due are started). Each point is handed to `next_work` to dispatch, as if the node before it
    had just committed.
    """
    resume = Resume()
    reached: set[str] = {""}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    ends = {node.child_context: node for node in plan.nodes if node.kind == "child_end"}

    def applied(path: str):
        ctx = contexts.get(path)
        return ctx.has_applied if ctx is not None else (lambda step_id: False)

    def walk(index: int | None, items: tuple[int, ...]) -> None:
        if index is None or (index, items) in seen:
            return
        seen.add((index, items))
        node = plan.node(index)
        path = concrete(node.context, items)
        has = applied(path)
        if node.kind in REAL_KINDS:
            if node.done_in(has, items):
                walk(node.next, items)
            else:
                resume.points.append((index, items))
        elif node.kind == "fork":
            for start in node.branch_starts:
                walk(start, items)
        elif node.kind == "join":
            if plan.is_done(index, has, items):
                walk(node.next, items)
        elif node.kind == "gate":
            if has(concrete(node.step_id, items)):
                walk(node.after, items)
            elif any(has(concrete(step_id, items)) for step_id in node.skips) or any(
                _exists(concrete(made, items), contexts) for made in node.creates
            ):
                walk(node.next, items)  # the gated step started: its condition was true
            else:
                resume.points.append((index, items))
        elif node.kind == "child_start":
            assert node.child_context is not None
            child = concrete(node.child_context, items)
            end = ends[node.child_context]
            if end.done_in(has, items):
                walk(end.next, items)  # merged already: the child's own state no longer matters
            elif child in contexts:
                reached.add(child)
                walk(node.next, items)
            else:
                resume.points.append((index, items))  # the child is created when this point is dispatched
        elif node.kind == "fan_out":
            fan_out(node, items, has)
        elif node.kind == "item_end":
            return  # an item that reached its end: counted by its fan-out
        else:  # finish
            resume.points.append((index, items))

    def fan_out(node: Node, items: tuple[int, ...], has) -> None:
        assert node.fan_out is not None and node.items_context is not None and node.collect is not None
        collect = plan.node(node.collect)
        started = _items_of(concrete(node.items_context, items), contexts)
        if collect.done_in(has, items):
            reached.update(concrete(node.items_context, (*items, number)) for number in started)
            walk(collect.next, items)
            return
        parent = contexts.get(concrete(node.context, items))
        total = list_length(parent.variables.get(node.fan_out.for_each)) if parent is not None else None
        if not started or total is None:
            resume.points.append((node.index, items))  # not started yet: it starts when dispatched
            return
        ended: dict[int, bool] = {}
        for number, item in started.items():
            inner = (*items, number)
            reached.add(concrete(node.items_context, inner))
            if item.has_applied(concrete(f"{node.items_context}!", inner)):
                ended[number] = True
            elif _item_done(plan, node, item, inner):
                ended[number] = False
        resume.fan_outs.append(FanOutSeed(node.index, items, total, ended))
        if len(ended) == total:
            resume.points.append((node.collect, items))
            return
        # Items start in order, one as each ends: those before this bound had started.
        for number in range(min(total, node.fan_out.max_concurrency + len(ended))):
            if number in ended:
                continue
            if number in started:
                walk(node.item_start, (*items, number))
            else:  # its context is lost: made again when it starts
                resume.start_items.append((node.index, number, items))

    walk(plan.start, ())
    orphans = {path for path in contexts if path not in reached and not _merged(path, contexts, ends)}
    # A child's path starts with its parent's: every descendant of an orphan is one too.
    orphans |= {path for path in contexts if any(path.startswith(f"{orphan}/") for orphan in orphans)}
    resume.orphans = sorted(orphans)
    return resume


def _item_done(plan: Plan, fan_out: Node, item: RunContext, inner: tuple[int, ...]) -> bool:
    """Whether an item's steps all ran: walking them from its first node reaches its end."""
    index = fan_out.item_start
    while index is not None:
        node = plan.node(index)
        if node.kind == "item_end":
            return True
        if node.kind in REAL_KINDS or node.kind == "join":
            if not plan.is_done(index, item.has_applied, inner):
                return False
            index = node.next
        elif node.kind == "gate":
            index = node.after if item.has_applied(concrete(node.step_id, inner)) else node.next
        elif node.kind == "fork":
            index = plan.node(node.next).index if node.next is not None else None  # the join decides
        elif node.kind == "child_start":
            end = next(n for n in plan.nodes if n.kind == "child_end" and n.child_context == node.child_context)
            index = end.index
        elif node.kind == "fan_out":
            index = node.collect
        else:
            return False
    return False


def _items_of(template: str, contexts: dict[str, RunContext]) -> dict[int, RunContext]:
    """The item contexts there are of a fan-out whose item path (outer items filled) is ``template``."""
    prefix = template[: -len("[]")] + "["
    found = {}
    for path, ctx in contexts.items():
        if path.startswith(prefix) and path.endswith("]") and path[len(prefix) : -1].isdigit():
            found[int(path[len(prefix) : -1])] = ctx
    return found


def _exists(path: str, contexts: dict[str, RunContext]) -> bool:
    if "[]" in path:  # a fan-out's items: any of them
        prefix = path.split("[]", 1)[0] + "["
        return any(existing.startswith(prefix) for existing in contexts)
    return path in contexts


def _merged(path: str, contexts: dict[str, RunContext], ends: dict[str | None, Node]) -> bool:
    """Whether a child context was merged back already (then it is history, not an orphan)."""
    end = ends.get(path)
    if end is None:
        return False
    parent = contexts.get(end.context)
    return parent is not None and parent.has_applied(end.step_id)
