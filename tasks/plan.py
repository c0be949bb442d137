"""A routine compiled into a graph of nodes, and what comes after a node (pure, no I/O).

Real nodes run as step tasks: ``action`` (changes its context) and ``child_end`` (merges a
sub-routine's context back into its parent). Virtual nodes are resolved by whichever worker
finished the node before them: ``fork`` (start every branch), ``join`` (go on once every branch
end is applied: the count is the context's own ``applied_steps``, committed with each step),
``child_start`` (create the child context) and ``finish`` (finalize the run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from state.errors import InvalidRoutine
from tasks.actions import builtin_args
from tasks.routine import (
    ActionStep,
    ExportSpec,
    MergeSpec,
    ParallelStep,
    Routine,
    SubRoutineStep,
    VariableSpec,
)

NodeKind = Literal["action", "child_end", "fork", "join", "child_start", "finish"]
REAL_KINDS = ("action", "child_end")


@dataclass
class Node:
    index: int
    kind: NodeKind
    step_id: str  # unique in the run; steps of a sub-routine are "<sub-routine step id>/<step id>"
    context: str  # context path: "" for the run's root context, else the sub-routine steps leading to it
    next: int | None = None
    action: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    builtin_args: Any = None  # a built-in action's args, validated once (`tasks.actions.BUILTINS`)
    branch_starts: list[int] = field(default_factory=list)
    branch_ends: list[int] = field(default_factory=list)
    child_context: str | None = None
    inherit: list[str] = field(default_factory=list)
    initial: dict[str, VariableSpec] = field(default_factory=dict)  # a sub-routine's own variables
    exports: list[ExportSpec] = field(default_factory=list)  # a sub-routine's own exports
    merge: MergeSpec | None = None
    concurrency: MergeSpec | None = None  # how concurrent sets in this node's context resolve
    inline: bool = False  # may run in the task of its predecessor (an inline routine's action step)
    reads: frozenset[str] = frozenset()  # the secret variables the step may read
    declassify: frozenset[str] = frozenset()  # written without taking on the sensitivity read


@dataclass
class Plan:
    routine: Routine
    nodes: list[Node]
    start: int
    contexts: dict[str, str]  # context path -> routine name
    inline_budget_s: float = 0.0  # how long a task may go on running inline successors

    def node(self, index: int) -> Node:
        return self.nodes[index]

    def is_done(self, index: int, applied: set[str] | Callable[[str], bool]) -> bool:
        """Whether a branch end is complete, judged from the applied steps of its context (a set,
        or a context's ``has_applied``)."""
        node = self.nodes[index]
        if node.kind == "join":
            return all(self.is_done(end, applied) for end in node.branch_ends)
        return applied(node.step_id) if callable(applied) else node.step_id in applied

    def real_steps(self) -> list[Node]:
        return [node for node in self.nodes if node.kind in REAL_KINDS]


def compile_plan(routine: Routine) -> Plan:
    nodes: list[Node] = []
    contexts: dict[str, str] = {"": routine.name}

    def add(node: Node) -> int:
        node.index = len(nodes)
        nodes.append(node)
        return node.index

    def sequence(steps: list[Any], ctx: str, owner: Routine, after: int) -> tuple[int, int]:
        """Compile steps that run one after another, then ``after``; returns (first, last) node."""
        first = last = after
        for position, step in enumerate(reversed(steps)):
            first, step_last = one(step, ctx, owner, first)
            if position == 0:
                last = step_last
        return first, last

    def step_id(ctx: str, raw_id: str) -> str:
        return f"{ctx}/{raw_id}" if ctx else raw_id

    def one(step: Any, ctx: str, owner: Routine, after: int) -> tuple[int, int]:
        sid = step_id(ctx, step.id)
        if isinstance(step, ActionStep):
            index = add(
                Node(
                    0, "action", sid, ctx, next=after, action=step.action, args=dict(step.args),
                    builtin_args=builtin_args(step.action, step.args),
                    concurrency=owner.concurrency, inline=owner.inline and step.inline is not False,
                    reads=frozenset(step.reads), declassify=frozenset(step.declassify),
                )
            )
            return index, index
        if isinstance(step, ParallelStep):
            join = add(Node(0, "join", sid, ctx, next=after))
            for branch in step.parallel:
                first, last = sequence(branch, ctx, owner, join)
                nodes[join].branch_starts.append(first)
                nodes[join].branch_ends.append(last)
            fork = add(Node(0, "fork", sid, ctx, next=join, branch_starts=list(nodes[join].branch_starts)))
            return fork, join
        assert isinstance(step, SubRoutineStep)
        if not isinstance(step.routine, Routine):
            raise InvalidRoutine(
                f"{owner.name}: step {sid!r}: sub-routine {str(step.routine)[:80]!r} was never loaded (use load_routine)"
            )
        child = sid  # the child's context path is its step id path
        contexts[child] = step.routine.name
        end = add(Node(0, "child_end", sid, ctx, next=after, child_context=child, merge=step.merge))
        first, _ = sequence(step.routine.steps, child, step.routine, end)
        start = add(
            Node(
                0, "child_start", f"{sid}:start", ctx, next=first, child_context=child,
                inherit=list(step.inherit), initial=step.routine.initial_variables(), exports=list(step.routine.exports),
            )
        )
        return start, end

    finish = add(Node(0, "finish", ":finish", ""))
    start, _ = sequence(routine.steps, "", routine, finish)
    return Plan(routine=routine, nodes=nodes, start=start, contexts=contexts, inline_budget_s=routine.inline_budget_s)
