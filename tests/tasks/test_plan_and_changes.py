"""Pure logic of execution: compiling routines into plans, joins, and applying step changes."""

from __future__ import annotations

import pytest

from state.errors import InvalidValue
from state.keys import context_id
from state.models import ConflictResolutionStrategy as S
from state.models import DataSensitivity, RunContext
from tasks.changes import Change, ContextView, apply_changes
from tasks.plan import compile_plan
from state.errors import InvalidRoutine
from tasks.routine import parse_routine
from tasks.steps import redact

ROUTINE = {
    "name": "outer",
    "steps": [
        {"id": "first", "action": "set", "args": {"name": "a", "value": 1}},
        {
            "id": "group",
            "parallel": [
                [{"id": "x1", "action": "increment", "args": {"name": "n"}}, {"id": "x2", "action": "increment", "args": {"name": "n"}}],
                [
                    {"id": "inner", "parallel": [[{"id": "y1", "action": "increment", "args": {"name": "n"}}], [{"id": "z1", "action": "increment", "args": {"name": "n"}}]]},
                ],
            ],
        },
        {
            "id": "sub",
            "routine": {"name": "child", "variables": {"own": 5}, "steps": [{"id": "c1", "action": "set", "args": {"name": "b", "value": 2}}]},
            "inherit": ["a"],
            "merge": {"default": "PARENT_WINS"},
        },
    ],
}


def test_plan_has_one_real_node_per_step_and_virtual_forks_joins_and_child_starts() -> None:
    plan = compile_plan(parse_routine(ROUTINE))
    assert sorted(node.step_id for node in plan.real_steps()) == ["first", "sub", "sub/c1", "x1", "x2", "y1", "z1"]
    kinds = sorted(node.kind for node in plan.nodes)
    assert kinds.count("fork") == 2 and kinds.count("join") == 2 and kinds.count("child_start") == 1
    assert plan.node(plan.start).step_id == "first"
    assert plan.contexts == {"": "outer", "sub": "child"}
    start = next(node for node in plan.nodes if node.kind == "child_start")
    assert start.inherit == ["a"] and start.initial["own"].value == 5
    assert plan.node(start.next).step_id == "sub/c1" and plan.node(start.next).context == "sub"
    end = next(node for node in plan.nodes if node.kind == "child_end")
    assert end.merge.default is S.PARENT_WINS and plan.node(end.next).kind == "finish"
    assert context_id("run1", "sub") == "run1/sub" and context_id("run1", "") == "run1"


def test_a_join_is_done_only_when_every_branch_end_is_applied_nested_joins_included() -> None:
    plan = compile_plan(parse_routine(ROUTINE))
    outer = next(node for node in plan.nodes if node.kind == "join" and node.step_id == "group")
    assert not plan.is_done(outer.index, {"x1", "x2", "y1"})
    assert not plan.is_done(outer.index, {"y1", "z1"})
    assert plan.is_done(outer.index, {"x2", "y1", "z1"})


def test_invalid_routines_are_refused_with_the_path_inside_the_file() -> None:
    with pytest.raises(InvalidRoutine, match=r"r.yaml: steps\[0\].parallel\[0\]\[0\]: action 'increment': args.name: Field required"):
        parse_routine({"name": "x", "steps": [{"id": "p", "parallel": [[{"id": "a", "action": "increment", "args": {}}]]}]}, source="r.yaml")
    with pytest.raises(InvalidRoutine, match="step id 'a' is used more than once"):
        parse_routine({"name": "x", "steps": [{"id": "a", "action": "sleep", "args": {"seconds": 0}}] * 2})


def _ctx(**variables) -> RunContext:
    ctx = RunContext(context_id="c", run_id="r", routine_id="x")
    for name, value in variables.items():
        ctx.set_variable(name, value, written_at=1.0)
    return ctx


def test_increment_and_append_apply_to_the_value_current_at_commit() -> None:
    base = _ctx(n=1, log=["a"])
    latest = _ctx(n=5, log=["a", "b"])  # other steps committed meanwhile
    apply_changes(latest, [Change.increment("n", 2), Change.append("log", "c")], base=base, now=2.0)
    assert latest.variables == {"n": 7, "log": ["a", "b", "c"]}


def test_a_set_that_meets_a_concurrent_set_is_resolved_by_the_strategy() -> None:
    base = _ctx(v="old")
    for strategy, expected in [(S.PARENT_WINS, "theirs"), (S.CHILD_WINS, "mine"), (S.LAST_WRITER_WINS, "mine")]:
        latest = _ctx(v="theirs")
        apply_changes(latest, [Change.set("v", "mine")], base=base, default=strategy, now=2.0)
        assert latest.variables["v"] == expected, strategy
    unchanged = _ctx(v="old")
    apply_changes(unchanged, [Change.set("v", "mine")], base=base, default=S.PARENT_WINS, now=2.0)
    assert unchanged.variables["v"] == "mine"  # nobody else changed it: no conflict


def test_increment_of_a_non_number_is_refused() -> None:
    with pytest.raises(InvalidValue, match="'n'"):
        apply_changes(_ctx(n="x"), [Change.increment("n")], base=_ctx(n="x"), now=1.0)


def test_a_view_hands_out_copies() -> None:
    ctx = _ctx(m={"k": [1]})
    ContextView(ctx).get("m")["k"].append(2)
    assert ctx.variables["m"] == {"k": [1]}


def test_redact_hides_sensitive_values_in_messages() -> None:
    ctx = _ctx(user="alice")
    ctx.set_variable("token", "tok-9876", sensitivity=DataSensitivity.SECRET)
    assert redact("bad token tok-9876 for alice", ctx) == "bad token *** for alice"
