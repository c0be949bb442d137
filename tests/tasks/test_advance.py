"""Walking a compiled plan (tasks/advance.py), pure: what a worker dispatches after a node commits
(`next_work`), and where a rebuilt run goes on and which child contexts it no longer reaches
(`resume_points`)."""

from __future__ import annotations

from typing import Any

import pytest

from state.keys import context_id
from state.models import RunContext
from tasks.advance import Next, Resume, next_work, resume_points
from tasks.plan import Node, Plan, compile_plan
from tasks.routine import parse_routine

RUN = "r"


def inc(step_id: str) -> dict[str, Any]:
    return {"id": step_id, "action": "increment", "args": {"name": "n"}}


SEQUENCE = {"name": "seq", "steps": [inc("a"), inc("b"), inc("c")]}

FAN = {
    "name": "fan",
    "steps": [
        inc("a"),
        {"id": "p", "parallel": [[inc("x1"), inc("x2")], [{"id": "q", "parallel": [[inc("y1")], [inc("z1")]]}]]},
        inc("after"),
    ],
}

SUB = {"name": "outer", "steps": [inc("a"), {"id": "sub", "routine": {"name": "kid", "steps": [inc("k1"), inc("k2")]}}, inc("z")]}

SUB_PARALLEL = {
    "name": "outer",
    "steps": [inc("a"), {"id": "sub", "routine": {"name": "kid", "steps": [{"id": "p", "parallel": [[inc("k1")], [inc("k2")]]}]}}],
}

NESTED = {
    "name": "outer",
    "steps": [
        inc("a"),
        {
            "id": "sub",
            "routine": {"name": "kid", "steps": [inc("k1"), {"id": "inner", "routine": {"name": "grandkid", "steps": [inc("g1")]}}]},
        },
        inc("z"),
    ],
}


def plan_of(definition: dict[str, Any]) -> Plan:
    return compile_plan(parse_routine(definition))


def at(plan: Plan, step_id: str, kind: str | None = None) -> int:
    """The index of the node with ``step_id`` (a fork and its join share one: then ``kind`` tells)."""
    found = [node.index for node in plan.nodes if node.step_id == step_id and (kind is None or node.kind == kind)]
    assert len(found) == 1, (step_id, kind, found)
    return found[0]


def point(plan: Plan, step_id: str, kind: str | None = None) -> tuple[int, tuple[int, ...]]:
    """A resume point (a node outside any fan-out item)."""
    return at(plan, step_id, kind), ()


def after(plan: Plan, step_id: str) -> int | None:
    return plan.node(at(plan, step_id, "action")).next


def ctx(path: str, applied: list[str], version: int = 1) -> RunContext:
    return RunContext(context_id=context_id(RUN, path), run_id=RUN, routine_id="x", version=version, applied_steps=applied)


def no_child(node: Node, parent: RunContext, items: tuple[int, ...] = ()) -> RunContext:
    raise AssertionError(f"no child context is created here (asked for {node.child_context!r})")


class Creating:
    """The moves of walking a plan with only sub-routines in it: children made by ``create``."""

    def __init__(self, create: Any) -> None:
        self.create = create

    def create_child(self, node: Node, parent: RunContext, items: tuple[int, ...]) -> RunContext:
        return self.create(node, parent)


# ---- next_work ----------------------------------------------------------------------------------


def test_after_a_step_of_a_sequence_comes_the_next_step_at_the_version_just_committed() -> None:
    plan = plan_of(SEQUENCE)
    work = next_work(plan, after(plan, "a"), {"": 2}, {"": ctx("", ["a"], 2)}, Creating(no_child))
    assert work == [Next(at(plan, "b"), {"": 2})]


def test_after_the_last_step_comes_the_runs_finalize() -> None:
    plan = plan_of(SEQUENCE)
    work = next_work(plan, after(plan, "c"), {"": 4}, {"": ctx("", ["a", "b", "c"], 4)}, Creating(no_child))
    assert work == [Next(None, {"": 4})]


def test_nothing_follows_no_node() -> None:
    plan = plan_of(SEQUENCE)
    assert next_work(plan, None, {"": 1}, {"": ctx("", [])}, Creating(no_child)) == []


def test_a_fork_starts_the_first_step_of_every_branch_nested_forks_included() -> None:
    plan = plan_of(FAN)
    work = next_work(plan, after(plan, "a"), {"": 2}, {"": ctx("", ["a"], 2)}, Creating(no_child))
    assert work == [Next(at(plan, "x1"), {"": 2}), Next(at(plan, "y1"), {"": 2}), Next(at(plan, "z1"), {"": 2})]


@pytest.mark.parametrize(
    ("finished", "applied", "expected"),
    [
        ("x2", ["a", "x1", "x2"], []),  # the other branch has not ended
        ("y1", ["a", "x1", "x2", "y1"], []),  # the nested group waits for z1, so the outer one too
        ("z1", ["a", "z1", "y1"], []),  # the nested group is done, the outer one waits for x2
        ("z1", ["a", "x1", "x2", "y1", "z1"], ["after"]),  # the last branch end: on after the group
        ("x2", ["a", "y1", "z1", "x1", "x2"], ["after"]),  # whichever branch ends last goes on
    ],
)
def test_a_join_goes_on_only_once_every_branch_end_is_applied(finished: str, applied: list[str], expected: list[str]) -> None:
    plan = plan_of(FAN)
    work = next_work(plan, after(plan, finished), {"": 7}, {"": ctx("", applied, 7)}, Creating(no_child))
    assert work == [Next(at(plan, step), {"": 7}) for step in expected]


def test_a_join_reached_without_a_commit_in_its_context_dispatches_nothing() -> None:
    plan = plan_of(FAN)
    join = at(plan, "p", "join")
    assert next_work(plan, join, {"": 7}, {}, Creating(no_child)) == []


def test_a_child_start_creates_the_child_context_and_goes_on_with_its_first_step() -> None:
    plan = plan_of(SUB)
    root = ctx("", ["a"], 2)
    created: list[tuple[str | None, str]] = []

    def create_child(node: Node, parent: RunContext) -> RunContext:
        created.append((node.child_context, parent.context_id))
        return ctx("sub", [], 1)

    work = next_work(plan, after(plan, "a"), {"": 2}, {"": root}, Creating(create_child))
    assert created == [("sub", RUN)]
    assert work == [Next(at(plan, "sub/k1"), {"": 2, "sub": 1})]
    assert plan.node(work[0].node).context == "sub"


def test_a_child_that_begins_with_a_parallel_group_starts_every_branch_in_the_child_created_once() -> None:
    plan = plan_of(SUB_PARALLEL)
    created: list[str | None] = []

    def create_child(node: Node, parent: RunContext) -> RunContext:
        created.append(node.child_context)
        return ctx("sub", [], 1)

    work = next_work(plan, after(plan, "a"), {"": 2}, {"": ctx("", ["a"], 2)}, Creating(create_child))
    assert created == ["sub"]
    assert work == [Next(at(plan, "sub/k1"), {"": 2, "sub": 1}), Next(at(plan, "sub/k2"), {"": 2, "sub": 1})]


def test_the_childs_last_step_is_followed_by_its_merge_into_the_parent() -> None:
    plan = plan_of(SUB)
    work = next_work(plan, after(plan, "sub/k2"), {"sub": 3}, {"sub": ctx("sub", ["sub/k1", "sub/k2"], 3)}, Creating(no_child))
    assert work == [Next(at(plan, "sub", "child_end"), {"sub": 3})]
    merge = plan.node(work[0].node)
    assert merge.context == "" and merge.child_context == "sub"


# ---- resume_points ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("applied", "expected"),
    [([], ["a"]), (["a"], ["b"]), (["a", "b"], ["c"])],
)
def test_a_sequence_resumes_at_its_first_step_not_applied(applied: list[str], expected: list[str]) -> None:
    plan = plan_of(SEQUENCE)
    assert resume_points(plan, {"": ctx("", applied)}) == Resume(points=[point(plan, s) for s in expected], orphans=[])


def test_a_run_with_every_step_applied_resumes_at_its_finalize() -> None:
    plan = plan_of(SEQUENCE)
    resume = resume_points(plan, {"": ctx("", ["a", "b", "c"])})
    assert [plan.node(index).kind for index, _ in resume.points] == ["finish"] and resume.orphans == []


def test_a_parallel_group_resumes_each_unfinished_branch_and_not_past_the_join() -> None:
    plan = plan_of(FAN)
    resume = resume_points(plan, {"": ctx("", ["a", "x1", "y1"])})
    assert resume.points == [point(plan, "x2"), point(plan, "z1")]


def test_a_parallel_group_whose_branches_all_ended_resumes_after_it() -> None:
    plan = plan_of(FAN)
    resume = resume_points(plan, {"": ctx("", ["a", "x1", "x2", "y1", "z1"])})
    assert resume.points == [point(plan, "after")]


def test_a_child_not_created_yet_resumes_at_its_start_which_creates_it_when_dispatched() -> None:
    plan = plan_of(SUB)
    root = ctx("", ["a"], 2)
    resume = resume_points(plan, {"": root})
    assert resume == Resume(points=[point(plan, "sub:start", "child_start")], orphans=[])

    work = next_work(plan, resume.points[0][0], {"": 2}, {"": root}, Creating(lambda node, parent: ctx("sub", [], 1)))
    assert work == [Next(at(plan, "sub/k1"), {"": 2, "sub": 1})]


def test_a_child_that_exists_resumes_at_its_own_first_step_not_applied() -> None:
    plan = plan_of(SUB)
    resume = resume_points(plan, {"": ctx("", ["a"]), "sub": ctx("sub", ["sub/k1"])})
    assert resume == Resume(points=[point(plan, "sub/k2")], orphans=[])


def test_a_child_whose_steps_all_ran_resumes_at_its_merge() -> None:
    plan = plan_of(SUB)
    resume = resume_points(plan, {"": ctx("", ["a"]), "sub": ctx("sub", ["sub/k1", "sub/k2"])})
    assert resume.points == [point(plan, "sub", "child_end")]


def test_a_child_merged_already_is_skipped_and_is_history_not_an_orphan() -> None:
    plan = plan_of(SUB)
    resume = resume_points(plan, {"": ctx("", ["a", "sub"]), "sub": ctx("sub", ["sub/k1"])})
    assert resume == Resume(points=[point(plan, "z")], orphans=[])


def test_children_the_rebuilt_parent_has_not_reached_are_orphans_with_all_their_descendants() -> None:
    plan = plan_of(NESTED)
    contexts = {
        "": ctx("", []),  # rebuilt to before "a": the sub-routine's start is not reached
        "sub": ctx("sub", ["sub/k1", "sub/inner"]),
        "sub/inner": ctx("sub/inner", ["sub/inner/g1"]),  # merged into "sub", which is itself an orphan
    }
    resume = resume_points(plan, contexts)
    assert resume == Resume(points=[point(plan, "a")], orphans=["sub", "sub/inner"])


def test_a_grandchild_of_a_reached_child_resumes_in_place_and_nothing_is_orphaned() -> None:
    plan = plan_of(NESTED)
    contexts = {"": ctx("", ["a"]), "sub": ctx("sub", ["sub/k1"]), "sub/inner": ctx("sub/inner", [])}
    assert resume_points(plan, contexts) == Resume(points=[point(plan, "sub/inner/g1")], orphans=[])
