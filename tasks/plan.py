"""A routine compiled into a graph of nodes, and what comes after a node (pure, no I/O).

Real nodes run as step tasks: ``action`` (changes its context), ``child_end`` (merges a
sub-routine's context back into its parent), ``collect`` (gathers a fan-out's items into its
parent) and ``wait`` (puts a signal's payload in its context: dispatched only once the wait is
resolved, by a signal or its deadline; until then the run holds no message). Virtual nodes are resolved by whichever worker finished the node before them: ``fork``
(start every branch), ``join`` (go on once every branch end is applied: the count is the
context's own ``applied_steps``, committed with each step), ``child_start`` (create the child
context), ``gate`` (a ``when``: go into the step, or record it skipped and go past it),
``fan_out`` (start the first items), ``item_end`` (count an item ended, start the next, collect
after the last) and ``finish`` (finalize the run).

A fan-out's items are one template: the nodes of its steps have ``[]`` in their context path and
step id, which a message's item indices fill in (`concrete`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from state.errors import InvalidRoutine
from state.models import DataSensitivity
from tasks.actions import builtin_args
from tasks.expressions import Condition
from tasks.routine import (
    ActionStep,
    ExportSpec,
    ForEachStep,
    MergeSpec,
    ParallelStep,
    RetrySpec,
    Routine,
    SubRoutineStep,
    VariableSpec,
    WaitSpec,
    WaitStep,
)

NodeKind = Literal[
    "action", "child_end", "collect", "wait", "fork", "join", "child_start", "gate", "fan_out", "item_end", "finish"
]
REAL_KINDS = ("action", "child_end", "collect", "wait")
ITEM = "[]"  # in a template path or step id: an item's index goes here
FAILURE = "failure"  # the variable of an item's context that holds why the item failed


def concrete(template: str, items: tuple[int, ...]) -> str:
    """A template path or step id with its item indices filled in, outermost first."""
    if not items or ITEM not in template:
        return template
    parts = template.split(ITEM)
    filled = [part + (f"[{items[i]}]" if i < len(items) else ITEM) for i, part in enumerate(parts[:-1])]
    return "".join(filled) + parts[-1]


_INDEX = re.compile(r"\[\d+\]")


def template_of(step_id: str) -> str:
    """A concrete step id as its template (``each[3]/work`` -> ``each[]/work``): one name per step."""
    return _INDEX.sub(ITEM, step_id)


@dataclass(frozen=True)
class Catch:
    """What a failed action does instead of failing its run (``on_failure: continue``, or an item of
    a fan-out that tolerates failures): its commit applies ``mark`` (a template step id: the step
    itself, the branch it stops, or the item it ends) with the error stored in ``into``, and the
    run goes on at node ``then``."""

    mark: str
    then: int | None
    into: str | None  # error_into, or the item's FAILURE
    collects: bool = False  # a group's: ``into`` is a list of every failure (else: the error itself)


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
    retry: RetrySpec | None = None
    timeout_s: float | None = None
    catch: Catch | None = None
    # Step ids whose being applied counts as this node done (a gate's skip, a stopped branch or item).
    passed_by: tuple[str, ...] = ()
    # gate: its condition, the node after the gated step, the real steps it skips (recorded so)
    # and the contexts the gated step creates (it started if one exists).
    condition: Condition | None = None
    after: int | None = None
    skips: list[str] = field(default_factory=list)
    creates: list[str] = field(default_factory=list)
    # fan_out / item_end / collect: the fan-out's step, its item context and first item node.
    fan_out: ForEachStep | None = None
    items_context: str | None = None
    item_start: int | None = None
    collect: int | None = None
    owner: int | None = None  # item_end and collect: the fan_out node
    wait: WaitSpec | None = None  # a wait: its event (a template), variable, timeout
    sensitivity: DataSensitivity = DataSensitivity.PUBLIC  # a wait: what its variable is declared

    def done_in(self, applied: Callable[[str], bool], items: tuple[int, ...] = ()) -> bool:
        """Whether this real node (or what passes it) is applied, by its context's ``has_applied``."""
        return applied(concrete(self.step_id, items)) or any(applied(concrete(mark, items)) for mark in self.passed_by)


@dataclass
class Plan:
    routine: Routine
    nodes: list[Node]
    start: int
    contexts: dict[str, str]  # context path -> routine name
    inline_budget_s: float = 0.0  # how long a task may go on running inline successors

    def node(self, index: int) -> Node:
        return self.nodes[index]

    def is_done(self, index: int, applied: set[str] | Callable[[str], bool], items: tuple[int, ...] = ()) -> bool:
        """Whether a branch end is complete, judged from the applied steps of its context (a set,
        or a context's ``has_applied``)."""
        node = self.nodes[index]
        has = applied if callable(applied) else applied.__contains__
        if node.kind == "join":
            return all(self.is_done(end, has, items) for end in node.branch_ends) or any(
                has(concrete(mark, items)) for mark in node.passed_by
            )
        return node.done_in(has, items)

    def real_steps(self) -> list[Node]:
        return [node for node in self.nodes if node.kind in REAL_KINDS]


def compile_plan(routine: Routine) -> Plan:
    return _Compiler(routine).plan()


class _Compiler:
    """Turns a routine's steps into nodes, last step first (each node knows the one after it)."""

    def __init__(self, routine: Routine) -> None:
        self.routine = routine
        self.nodes: list[Node] = []
        self.contexts: dict[str, str] = {"": routine.name}

    def plan(self) -> Plan:
        finish = self.add(Node(0, "finish", ":finish", ""))
        start, _ = self.sequence(self.routine.steps, "", self.routine, finish, None)
        return Plan(
            routine=self.routine, nodes=self.nodes, start=start, contexts=self.contexts,
            inline_budget_s=self.routine.inline_budget_s,
        )

    def add(self, node: Node) -> int:
        node.index = len(self.nodes)
        self.nodes.append(node)
        return node.index

    def sequence(self, steps: list[Any], ctx: str, owner: Routine, after: int, catch: Catch | None) -> tuple[int, int]:
        """Compile steps that run one after another, then ``after``; returns (first, last) node.
        ``catch``: what a failure inside does instead of failing the run (a group's or an item's)."""
        first = last = after
        for position, step in enumerate(reversed(steps)):
            first, step_last = self.guarded(step, ctx, owner, first, catch)
            if position == 0:
                last = step_last
        return first, last

    def guarded(self, step: Any, ctx: str, owner: Routine, after: int, catch: Catch | None) -> tuple[int, int]:
        """A step behind its ``when``: a gate node before it, which skips to ``after``."""
        built = len(self.nodes)
        first, last = self.one(step, ctx, owner, after, catch)
        if step.when is None:
            return first, last
        sid = _step_id(ctx, step.id)
        gate_id = f"{sid}?"
        inside = self.nodes[built:]
        for node in inside:
            if node.context == ctx:  # counted done by the skip (those in child contexts never start)
                node.passed_by = (*node.passed_by, gate_id)
        skips = [node.step_id for node in inside if node.kind in REAL_KINDS and node.context == ctx]
        creates = [node.child_context or node.items_context or "" for node in inside if node.kind in ("child_start", "fan_out")]
        reads = frozenset(getattr(step, "reads", ()))
        gate = self.add(
            Node(0, "gate", gate_id, ctx, next=first, after=after, condition=step.when, skips=skips, creates=creates, reads=reads)
        )
        return gate, last

    def one(self, step: Any, ctx: str, owner: Routine, after: int, catch: Catch | None) -> tuple[int, int]:
        sid = _step_id(ctx, step.id)
        if isinstance(step, ActionStep):
            index = self.add(
                Node(
                    0, "action", sid, ctx, next=after, action=step.action, args=dict(step.args),
                    builtin_args=builtin_args(step.action, step.args),
                    concurrency=owner.concurrency, inline=owner.inline and step.inline is not False and step.timeout_s is None,
                    reads=frozenset(step.reads), declassify=frozenset(step.declassify),
                    retry=step.retry, timeout_s=step.timeout_s,
                )
            )
            own = Catch(sid, after, step.error_into) if step.on_failure == "continue" else None
            self.nodes[index].catch = own or catch
            return index, index
        if isinstance(step, WaitStep):
            declared = owner.initial_variables().get(step.wait_for.into)
            level = declared.sensitivity if declared is not None else DataSensitivity.PUBLIC
            index = self.add(Node(0, "wait", sid, ctx, next=after, wait=step.wait_for, sensitivity=level))
            return index, index
        if isinstance(step, ParallelStep):
            join = self.add(Node(0, "join", sid, ctx, next=after))
            for number, branch in enumerate(step.parallel):
                stop = f"{sid}#{number}!"  # a failed step stops its branch: the join counts it ended
                own = Catch(stop, join, step.error_into, collects=True) if step.on_failure == "continue" else catch
                built = len(self.nodes)
                first, last = self.sequence(branch, ctx, owner, join, own)
                if step.on_failure == "continue":
                    for node in self.nodes[built:]:
                        if node.context == ctx:
                            node.passed_by = (*node.passed_by, stop)
                self.nodes[join].branch_starts.append(first)
                self.nodes[join].branch_ends.append(last)
            fork = self.add(Node(0, "fork", sid, ctx, next=join, branch_starts=list(self.nodes[join].branch_starts)))
            return fork, join
        if isinstance(step, ForEachStep):
            return self.fan_out(step, sid, ctx, owner, after)
        assert isinstance(step, SubRoutineStep)
        if not isinstance(step.routine, Routine):
            raise InvalidRoutine(
                f"{owner.name}: step {sid!r}: sub-routine {str(step.routine)[:80]!r} was never loaded (use load_routine)"
            )
        child = sid  # the child's context path is its step id path
        self.contexts[child] = step.routine.name
        end = self.add(Node(0, "child_end", sid, ctx, next=after, child_context=child, merge=step.merge))
        first, _ = self.sequence(step.routine.steps, child, step.routine, end, None)
        start = self.add(
            Node(
                0, "child_start", f"{sid}:start", ctx, next=first, child_context=child,
                inherit=list(step.inherit), initial=step.routine.initial_variables(), exports=list(step.routine.exports),
            )
        )
        return start, end

    def fan_out(self, step: ForEachStep, sid: str, ctx: str, owner: Routine, after: int) -> tuple[int, int]:
        """``fan_out`` starts items; each runs the steps in its own context, then ``item_end``;
        after the last, ``collect`` (a real step, the fan-out's own id) brings them back."""
        items = f"{sid}{ITEM}"
        collect = self.add(Node(0, "collect", sid, ctx, next=after, fan_out=step, items_context=items, merge=step.merge))
        item_end = self.add(Node(0, "item_end", f"{items}:end", items, fan_out=step, collect=collect))
        stop = f"{items}!"  # an item that failed (and is tolerated) ends there
        catch = Catch(stop, item_end, FAILURE) if step.tolerate_failures != 0 else None
        built = len(self.nodes)
        first, _ = self.sequence(step.steps, items, owner, item_end, catch)
        for node in self.nodes[built:]:
            if node.context == items:
                node.passed_by = (*node.passed_by, stop)
        start = self.add(
            Node(
                0, "fan_out", f"{sid}:start", ctx, fan_out=step, items_context=items, item_start=first, collect=collect,
                inherit=list(step.inherit), concurrency=owner.concurrency,
            )
        )
        self.nodes[item_end].owner = start
        self.nodes[collect].owner = start
        return start, collect


def _step_id(ctx: str, raw_id: str) -> str:
    return f"{ctx}/{raw_id}" if ctx else raw_id
