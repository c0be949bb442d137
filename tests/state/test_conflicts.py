"""Conflict resolution: every strategy through resolve_variable_conflicts and RunContext.merge_child."""

from __future__ import annotations

import copy

import pytest

from state.conflicts import MergeResult, deep_merge, resolve_variable_conflicts
from state.errors import InvalidValue, LimitExceeded, MergeConflict
from state.models import (
    ConflictResolutionStrategy as S,
)
from state.models import (
    DataSensitivity,
    ExportDeclaration,
    ExportDestination,
    ResourceLimits,
    RunContext,
    VariableConflict,
)

PUBLIC, INTERNAL, CONFIDENTIAL, SECRET = (
    DataSensitivity.PUBLIC,
    DataSensitivity.INTERNAL,
    DataSensitivity.CONFIDENTIAL,
    DataSensitivity.SECRET,
)


def snapshot(ctx: RunContext) -> dict:
    return copy.deepcopy(ctx.model_dump())


def by_name(conflicts: list[VariableConflict]) -> dict[str, VariableConflict]:
    names = [c.name for c in conflicts]
    assert len(names) == len(set(names)), f"a variable is reported twice: {names}"
    return {c.name: c for c in conflicts}


CURRENT = {"same": 1, "both": "parent", "cfg": {"a": 1, "n": {"x": 1}}, "only_current": [1]}
INCOMING = {"same": 1, "both": "child", "cfg": {"b": 2, "n": {"y": 2}}, "only_incoming": True}


# ---- resolve_variable_conflicts: each strategy ----------------------------------------------


def test_without_overlap_the_result_is_the_union_and_there_are_no_conflicts():
    result = resolve_variable_conflicts({"a": 1}, {"b": 2}, default=S.FAIL)
    assert isinstance(result, MergeResult)
    assert result.values == {"a": 1, "b": 2}
    assert result.conflicts == []


def test_equal_values_on_both_sides_are_not_conflicts():
    result = resolve_variable_conflicts({"a": {"k": [1, 2]}}, {"a": {"k": [1, 2]}}, default=S.FAIL)
    assert result.values == {"a": {"k": [1, 2]}} and result.conflicts == []


def test_parent_wins():
    result = resolve_variable_conflicts(CURRENT, INCOMING, default=S.PARENT_WINS)
    assert result.values == {
        "same": 1,
        "both": "parent",
        "cfg": {"a": 1, "n": {"x": 1}},
        "only_current": [1],
        "only_incoming": True,
    }
    conflicts = by_name(result.conflicts)
    assert set(conflicts) == {"both", "cfg"}
    assert conflicts["both"] == VariableConflict(
        name="both", current_value="parent", incoming_value="child", resolved_value="parent", strategy=S.PARENT_WINS
    )
    assert conflicts["cfg"].resolved_value == {"a": 1, "n": {"x": 1}}
    assert conflicts["cfg"].strategy is S.PARENT_WINS


def test_child_wins_is_the_default():
    for result in (
        resolve_variable_conflicts(CURRENT, INCOMING),
        resolve_variable_conflicts(CURRENT, INCOMING, default="CHILD_WINS"),
    ):
        assert result.values == {
            "same": 1,
            "both": "child",
            "cfg": {"b": 2, "n": {"y": 2}},
            "only_current": [1],
            "only_incoming": True,
        }
        conflicts = by_name(result.conflicts)
        assert set(conflicts) == {"both", "cfg"}
        assert conflicts["both"] == VariableConflict(
            name="both", current_value="parent", incoming_value="child", resolved_value="child", strategy=S.CHILD_WINS
        )


def test_merge_objects_deep_merges_mappings_and_incoming_wins_elsewhere():
    result = resolve_variable_conflicts(CURRENT, INCOMING, default=S.MERGE_OBJECTS)
    assert result.values["cfg"] == {"a": 1, "b": 2, "n": {"x": 1, "y": 2}}
    assert result.values["both"] == "child"  # not mappings: incoming wins
    conflicts = by_name(result.conflicts)
    assert set(conflicts) == {"both", "cfg"}
    assert conflicts["cfg"].resolved_value == {"a": 1, "b": 2, "n": {"x": 1, "y": 2}}
    assert conflicts["cfg"].current_value == {"a": 1, "n": {"x": 1}}
    assert conflicts["cfg"].incoming_value == {"b": 2, "n": {"y": 2}}
    assert all(c.strategy is S.MERGE_OBJECTS for c in result.conflicts)


@pytest.mark.parametrize(
    "current_at, incoming_at, winner",
    [
        ({"v": 20.0}, {"v": 10.0}, "parent"),  # current written later
        ({"v": 10.0}, {"v": 20.0}, "child"),  # incoming written later
        ({"v": 10.0}, {"v": 10.0}, "child"),  # tie
        ({}, {"v": 10.0}, "child"),  # missing current time
        ({"v": 10.0}, {}, "child"),  # missing incoming time
        (None, None, "child"),
    ],
    ids=["current-later", "incoming-later", "tie", "no-current-time", "no-incoming-time", "no-times"],
)
def test_last_writer_wins(current_at, incoming_at, winner):
    result = resolve_variable_conflicts(
        {"v": "parent", "w": 1},
        {"v": "child", "w": 2},
        default=S.LAST_WRITER_WINS,
        current_written_at=current_at,
        incoming_written_at=incoming_at,
    )
    assert result.values["v"] == winner
    assert result.values["w"] == 2  # no times for w: incoming
    conflict = by_name(result.conflicts)["v"]
    assert (conflict.resolved_value, conflict.strategy) == (winner, S.LAST_WRITER_WINS)


def test_last_writer_wins_compares_times_per_variable():
    result = resolve_variable_conflicts(
        {"a": "parent", "b": "parent"},
        {"a": "child", "b": "child"},
        default="LAST_WRITER_WINS",
        current_written_at={"a": 5.0, "b": 1.0},
        incoming_written_at={"a": 1.0, "b": 5.0},
    )
    assert result.values == {"a": "parent", "b": "child"}


def test_fail_names_every_conflicting_variable_and_changes_nothing():
    current, incoming = copy.deepcopy(CURRENT), copy.deepcopy(INCOMING)
    with pytest.raises(MergeConflict) as info:
        resolve_variable_conflicts(current, incoming, default=S.FAIL)
    assert sorted(info.value.variables) == ["both", "cfg"]
    assert "both" in str(info.value) and "cfg" in str(info.value)
    assert info.value.code == "MERGE_CONFLICT"
    assert current == CURRENT and incoming == INCOMING


def test_per_variable_strategies_override_the_default():
    result = resolve_variable_conflicts(
        {"a": "p", "b": {"x": 1}, "c": "p", "d": "p"},
        {"a": "c", "b": {"y": 2}, "c": "c", "d": "c"},
        default=S.PARENT_WINS,
        per_variable={"a": S.CHILD_WINS, "b": "MERGE_OBJECTS", "c": S.LAST_WRITER_WINS},
        current_written_at={"c": 9.0},
        incoming_written_at={"c": 1.0},
    )
    assert result.values == {"a": "c", "b": {"x": 1, "y": 2}, "c": "p", "d": "p"}
    assert {c.name: c.strategy for c in result.conflicts} == {
        "a": S.CHILD_WINS,
        "b": S.MERGE_OBJECTS,
        "c": S.LAST_WRITER_WINS,
        "d": S.PARENT_WINS,
    }


def test_per_variable_fail_refuses_the_whole_merge_naming_only_its_variables():
    with pytest.raises(MergeConflict) as info:
        resolve_variable_conflicts(
            {"a": 1, "b": 1, "c": 1},
            {"a": 2, "b": 2, "c": 2},
            default=S.CHILD_WINS,
            per_variable={"b": S.FAIL, "c": "FAIL"},
        )
    assert sorted(info.value.variables) == ["b", "c"]


def test_per_variable_fail_on_a_non_conflicting_variable_does_not_refuse():
    result = resolve_variable_conflicts({"a": 1, "b": 1}, {"a": 2, "b": 1, "c": 3}, per_variable={"b": S.FAIL, "c": S.FAIL})
    assert result.values == {"a": 2, "b": 1, "c": 3}
    assert [c.name for c in result.conflicts] == ["a"]


def test_default_fail_can_be_relaxed_per_variable():
    result = resolve_variable_conflicts({"a": 1}, {"a": 2}, default=S.FAIL, per_variable={"a": S.PARENT_WINS})
    assert result.values == {"a": 1}


def test_unknown_strategy_names_are_refused():
    with pytest.raises(InvalidValue) as info:
        resolve_variable_conflicts({"a": 1}, {"a": 2}, per_variable={"a": "SOMETIMES"})
    assert "'a'" in str(info.value)
    with pytest.raises(ValueError):
        resolve_variable_conflicts({"a": 1}, {"a": 2}, default="SOMETIMES")


@pytest.mark.parametrize("strategy", list(S))
def test_inputs_are_not_mutated_and_the_result_does_not_alias_them(strategy):
    current = {"cfg": {"n": {"x": [1]}}, "keep": {"k": [1]}}
    incoming = {"cfg": {"n": {"y": [2]}}, "new": {"z": [3]}}
    current_copy, incoming_copy = copy.deepcopy(current), copy.deepcopy(incoming)
    per_variable = {"cfg": S.MERGE_OBJECTS} if strategy is S.FAIL else None
    result = resolve_variable_conflicts(current, incoming, default=strategy, per_variable=per_variable)
    assert current == current_copy and incoming == incoming_copy
    for value in result.values.values():
        for inner in value.values():
            if isinstance(inner, dict):
                for leaf in inner.values():
                    leaf.append("mutated")
            else:
                inner.append("mutated")
    assert current == current_copy and incoming == incoming_copy


# ---- base= (concurrent versions) -------------------------------------------------------------


@pytest.mark.parametrize("strategy", [S.FAIL, S.PARENT_WINS, S.CHILD_WINS])
def test_with_base_a_variable_current_still_holds_at_base_is_not_a_conflict(strategy):
    base = {"a": 1, "b": 1, "c": 1}
    current = {"a": 1, "b": 5, "c": 1}  # someone else changed b meanwhile
    incoming = {"a": 2}  # the refused writer changed a
    result = resolve_variable_conflicts(current, incoming, default=strategy, base=base)
    assert result.values == {"a": 2, "b": 5, "c": 1}
    assert result.conflicts == []


def test_with_base_a_variable_both_sides_changed_is_a_conflict():
    base = {"a": 1}
    current, incoming = {"a": 5}, {"a": 2}
    with pytest.raises(MergeConflict) as info:
        resolve_variable_conflicts(current, incoming, default=S.FAIL, base=base)
    assert info.value.variables == ["a"]
    result = resolve_variable_conflicts(current, incoming, default=S.PARENT_WINS, base=base)
    assert result.values == {"a": 5}
    assert by_name(result.conflicts)["a"].resolved_value == 5


def test_with_base_a_variable_both_sides_added_differently_is_a_conflict():
    with pytest.raises(MergeConflict) as info:
        resolve_variable_conflicts({"a": 1, "new": "x"}, {"new": "y"}, default=S.FAIL, base={"a": 1})
    assert info.value.variables == ["new"]


def test_without_base_every_differing_value_is_a_conflict():
    with pytest.raises(MergeConflict):
        resolve_variable_conflicts({"a": 1}, {"a": 2}, default=S.FAIL)


def test_with_base_a_variable_current_deleted_is_taken_from_incoming():
    result = resolve_variable_conflicts({}, {"a": 2}, default=S.FAIL, base={"a": 1})
    assert result.values == {"a": 2} and result.conflicts == []


# ---- deep_merge -----------------------------------------------------------------------------


def test_deep_merge_merges_nested_mappings_recursively():
    current = {"a": 1, "n": {"x": 1, "m": {"p": 1, "q": [1]}}, "keep": {"k": 1}}
    incoming = {"b": 2, "n": {"y": 2, "m": {"q": [2], "r": 3}}, "keep": "scalar"}
    assert deep_merge(current, incoming) == {
        "a": 1,
        "b": 2,
        "n": {"x": 1, "y": 2, "m": {"p": 1, "q": [2], "r": 3}},
        "keep": "scalar",
    }


@pytest.mark.parametrize(
    "current, incoming, expected",
    [
        ([1, 2], [3], [3]),  # lists are leaves
        ({"a": 1}, 5, 5),
        (5, {"a": 1}, {"a": 1}),
        ({"a": 1}, None, None),
        ({"a": {"b": 1}}, {"a": None}, {"a": None}),
        ({"a": None}, {"a": {"b": 1}}, {"a": {"b": 1}}),
        ({}, {}, {}),
    ],
)
def test_deep_merge_leaves_go_to_incoming(current, incoming, expected):
    assert deep_merge(current, incoming) == expected


def test_deep_merge_copies_its_inputs():
    current, incoming = {"n": {"x": [1]}}, {"n": {"y": [2]}, "z": {"w": [3]}}
    merged = deep_merge(current, incoming)
    merged["n"]["x"].append(9)
    merged["n"]["y"].append(9)
    merged["z"]["w"].append(9)
    assert current == {"n": {"x": [1]}} and incoming == {"n": {"y": [2]}, "z": {"w": [3]}}


# ---- merge_child ----------------------------------------------------------------------------


def family(*, parent_limits: ResourceLimits | None = None, child_limits: ResourceLimits | None = None):
    """A parent with a, cfg, token; a child inheriting all three; then both change a and cfg."""
    parent = RunContext(
        context_id="parent", run_id="run", routine_id="main", limits=parent_limits or ResourceLimits()
    )
    parent.set_variable("a", "p0", written_at=1.0)
    parent.set_variable("cfg", {"x": 1, "n": {"k": 1}}, sensitivity=INTERNAL, written_at=1.0)
    parent.set_variable("token", "t0", sensitivity=SECRET, written_at=1.0)
    parent.set_variable("untouched", 0, written_at=1.0)
    child = parent.create_child("sub", inherit=["a", "cfg", "token", "untouched"], limits=child_limits)
    child.set_variable("a", "c1", written_at=3.0)
    child.set_variable("cfg", {"x": 1, "n": {"k": 1, "j": 2}, "y": 2}, written_at=3.0)
    child.set_variable("fresh", {"new": True}, written_at=3.0)
    parent.set_variable("a", "p1", written_at=2.0)
    parent.set_variable("cfg", {"x": 9, "n": {"k": 5}, "z": 3}, written_at=2.0)
    return parent, child


def test_merge_child_child_wins_by_default():
    parent, child = family()
    conflicts = parent.merge_child(child)
    assert parent.variables == {
        "a": "c1",
        "cfg": {"x": 1, "n": {"k": 1, "j": 2}, "y": 2},
        "token": "t0",
        "untouched": 0,
        "fresh": {"new": True},
    }
    c = by_name(conflicts)
    assert set(c) == {"a", "cfg"}
    assert (c["a"].current_value, c["a"].incoming_value, c["a"].resolved_value, c["a"].strategy) == (
        "p1",
        "c1",
        "c1",
        S.CHILD_WINS,
    )


def test_merge_child_parent_wins():
    parent, child = family()
    conflicts = parent.merge_child(child, default=S.PARENT_WINS)
    assert parent.variables == {
        "a": "p1",
        "cfg": {"x": 9, "n": {"k": 5}, "z": 3},
        "token": "t0",
        "untouched": 0,
        "fresh": {"new": True},  # not a conflict: simply added
    }
    c = by_name(conflicts)
    assert set(c) == {"a", "cfg"}
    assert c["a"].resolved_value == "p1" and c["a"].strategy is S.PARENT_WINS
    assert c["cfg"].resolved_value == {"x": 9, "n": {"k": 5}, "z": 3}


def test_merge_child_merge_objects():
    parent, child = family()
    conflicts = parent.merge_child(child, default="MERGE_OBJECTS")
    assert parent.get("cfg") == {"x": 1, "n": {"k": 1, "j": 2}, "y": 2, "z": 3}
    assert parent.get("a") == "c1"
    assert by_name(conflicts)["cfg"].resolved_value == {"x": 1, "n": {"k": 1, "j": 2}, "y": 2, "z": 3}


def test_merge_child_last_writer_wins_uses_each_variables_write_time():
    parent, child = family()
    parent.set_variable("a", "p2", written_at=10.0)  # parent wrote a after the child did
    conflicts = parent.merge_child(child, default=S.LAST_WRITER_WINS)
    assert parent.get("a") == "p2"  # 10.0 > 3.0
    assert parent.get("cfg") == {"x": 1, "n": {"k": 1, "j": 2}, "y": 2}  # 3.0 > 2.0
    assert {c.name: c.resolved_value for c in conflicts} == {"a": "p2", "cfg": parent.get("cfg")}
    assert parent.written_at["a"] == 10.0 and parent.written_at["cfg"] == 3.0


def test_merge_child_last_writer_wins_tie_goes_to_the_child():
    parent, child = family()
    parent.set_variable("a", "p2", written_at=3.0)
    parent.merge_child(child, default=S.LAST_WRITER_WINS)
    assert parent.get("a") == "c1"


def test_merge_child_fail_refuses_names_all_conflicts_and_leaves_the_parent_unchanged():
    parent, child = family()
    child.mark_for_export("fresh", "blackboard", scope="team:ops")
    before = snapshot(parent)
    with pytest.raises(MergeConflict) as info:
        parent.merge_child(child, default=S.FAIL)
    assert sorted(info.value.variables) == ["a", "cfg"]
    assert snapshot(parent) == before
    assert "fresh" not in parent.variables and parent.exports == []


def test_merge_child_per_variable_overrides():
    parent, child = family()
    conflicts = parent.merge_child(child, default=S.FAIL, per_variable={"a": S.PARENT_WINS, "cfg": "MERGE_OBJECTS"})
    assert parent.get("a") == "p1"
    assert parent.get("cfg") == {"x": 1, "n": {"k": 1, "j": 2}, "y": 2, "z": 3}
    assert parent.get("fresh") == {"new": True}
    assert {c.name: c.strategy for c in conflicts} == {"a": S.PARENT_WINS, "cfg": S.MERGE_OBJECTS}


def test_merge_child_per_variable_fail_refuses_only_naming_its_variable():
    parent, child = family()
    before = snapshot(parent)
    with pytest.raises(MergeConflict) as info:
        parent.merge_child(child, per_variable={"cfg": S.FAIL})
    assert info.value.variables == ["cfg"]
    assert snapshot(parent) == before


def test_merge_child_brings_back_only_what_the_child_added_or_changed():
    parent = RunContext(context_id="p", run_id="r", routine_id="x")
    parent.set_variable("kept", 1)
    parent.set_variable("not_inherited", "p")
    child = parent.create_child("sub", inherit=["kept"])
    parent.set_variable("kept", 2)  # changed by the parent only
    child.set_variable("added", "c")
    child.set_variable("kept", 1)  # rewritten with the inherited value: not a change
    conflicts = parent.merge_child(child, default=S.FAIL)
    assert conflicts == []
    assert parent.variables == {"kept": 2, "not_inherited": "p", "added": "c"}


def test_merge_child_a_changed_inherited_variable_differing_from_the_parent_is_a_conflict():
    parent = RunContext(context_id="p", run_id="r", routine_id="x")
    parent.set_variable("v", 1)
    child = parent.create_child("sub", inherit=["v"])
    child.set_variable("v", 2)
    conflicts = parent.merge_child(child)
    assert parent.get("v") == 2
    assert [(c.name, c.current_value, c.incoming_value, c.resolved_value) for c in conflicts] == [("v", 1, 2, 2)]


def test_merge_child_same_change_on_both_sides_is_not_a_conflict():
    parent = RunContext(context_id="p", run_id="r", routine_id="x")
    parent.set_variable("v", 1)
    child = parent.create_child("sub", inherit=["v"])
    child.set_variable("v", {"done": True})
    parent.set_variable("v", {"done": True})
    assert parent.merge_child(child, default=S.FAIL) == []
    assert parent.get("v") == {"done": True}


def test_merge_child_nested_in_place_change_is_brought_back():
    parent = RunContext(context_id="p", run_id="r", routine_id="x")
    parent.set_variable("cfg", {"n": {"k": 1}})
    child = parent.create_child("sub", inherit=["cfg"])
    child.get("cfg")["n"]["k"] = 2
    parent.merge_child(child)
    assert parent.get("cfg") == {"n": {"k": 2}}


def test_merge_child_result_is_independent_of_the_child():
    parent, child = family()
    parent.merge_child(child)
    child.get("fresh")["new"] = False
    child.get("cfg")["n"]["k"] = 100
    assert parent.get("fresh") == {"new": True}
    assert parent.get("cfg") == {"x": 1, "n": {"k": 1, "j": 2}, "y": 2}


def test_merged_sensitivity_is_the_higher_of_parent_and_child():
    parent = RunContext(context_id="p", run_id="r", routine_id="x")
    parent.set_variable("shared", "p", sensitivity=CONFIDENTIAL)
    parent.set_variable("inherited", "p", sensitivity=INTERNAL)
    child = parent.create_child("sub", inherit=["inherited"])
    child.set_variable("shared", "c", sensitivity=PUBLIC)  # child's own variable of the same name
    child.set_variable("inherited", "c", sensitivity=SECRET)  # raised in the child
    child.set_variable("new_secret", "c", sensitivity=SECRET)
    child.set_variable("new_public", "c")
    parent.merge_child(child)
    assert parent.sensitivity_of("shared") is CONFIDENTIAL
    assert parent.sensitivity_of("inherited") is SECRET
    assert parent.sensitivity_of("new_secret") is SECRET
    assert parent.sensitivity_of("new_public") is PUBLIC
    assert parent.masked_variables() == {"shared": "***", "inherited": "***", "new_secret": "***", "new_public": "c"}


def test_merged_sensitivity_keeps_the_parents_level_when_the_parent_wins():
    parent = RunContext(context_id="p", run_id="r", routine_id="x")
    parent.set_variable("shared", "p", sensitivity=SECRET)
    child = parent.create_child("sub")
    child.set_variable("shared", "c", sensitivity=INTERNAL)
    parent.merge_child(child, default=S.PARENT_WINS)
    assert parent.get("shared") == "p" and parent.sensitivity_of("shared") is SECRET


def test_child_exports_are_carried_to_the_parent_once():
    parent, child = family()
    shared = parent.mark_for_export("a", ExportDestination.PERSISTENT)
    child.mark_for_export("a", "persistent")  # the same declaration
    child.mark_for_export("fresh", "blackboard", scope="swarm:7", key="fresh_out")
    parent.merge_child(child)
    assert parent.exports == [
        shared,
        ExportDeclaration(variable="fresh", destination=ExportDestination.BLACKBOARD, scope="swarm:7", key="fresh_out"),
    ]
    parent.merge_child(child)  # merging again adds nothing twice
    assert len(parent.exports) == 2


def test_merge_child_refuses_a_context_that_is_not_its_child():
    parent, child = family()
    stranger = RunContext(context_id="other", run_id="run", routine_id="x")
    grandchild = child.create_child("deeper")
    before = snapshot(parent)
    for not_a_child in (stranger, grandchild):
        with pytest.raises(InvalidValue):
            parent.merge_child(not_a_child)
    assert snapshot(parent) == before


@pytest.mark.parametrize(
    "parent_limits, child_change, expected",
    [
        # parent: a, cfg, token, untouched; the child brings back a, cfg, fresh and the new ones
        (ResourceLimits(max_variables=5), {"n1": 1, "n2": 2}, ("max_variables", 7, 5)),
        (ResourceLimits(max_value_bytes=35), {"big": "x" * 40}, ("max_value_bytes", 42, 35)),
        # after the merge: a 4 + cfg 31 + token 4 + untouched 1 + fresh 12 + big 32 = 84 bytes
        (ResourceLimits(max_context_bytes=80), {"big": "x" * 30}, ("max_context_bytes", 84, 80)),
    ],
    ids=["max_variables", "max_value_bytes", "max_context_bytes"],
)
def test_merge_child_over_the_parents_limits_is_refused_and_changes_nothing(parent_limits, child_change, expected):
    parent, child = family(parent_limits=parent_limits, child_limits=ResourceLimits())
    child.mark_for_export("a", "persistent")
    for name, value in child_change.items():
        child.set_variable(name, value)
    before = snapshot(parent)
    with pytest.raises(LimitExceeded) as info:
        parent.merge_child(child)
    limit, size, maximum = expected
    assert (info.value.limit, info.value.size, info.value.maximum) == (limit, size, maximum)
    assert info.value.variable in set(child.child_changes())
    assert snapshot(parent) == before


def test_merge_child_brings_back_a_change_from_1_to_true():
    parent = RunContext(context_id="p", run_id="r", routine_id="x")
    parent.set_variable("flag", 1)
    child = parent.create_child("sub", inherit=["flag"])
    child.set_variable("flag", True)
    parent.merge_child(child)
    assert parent.get("flag") is True


@pytest.mark.parametrize("strategy", [S.FAIL, S.PARENT_WINS])
def test_json_different_values_1_and_true_are_a_conflict(strategy):
    try:
        result = resolve_variable_conflicts({"n": 1, "m": {"k": 0}}, {"n": True, "m": {"k": False}}, default=strategy)
    except MergeConflict as exc:
        assert sorted(exc.variables) == ["m", "n"]
        return
    assert result.values["n"] is not True
    assert result.values == {"n": 1, "m": {"k": 0}} and [c.name for c in result.conflicts] == ["m", "n"]
    assert result.values["m"]["k"] is not False


@pytest.mark.parametrize("strategy", [S.FAIL, S.PARENT_WINS])
def test_merge_child_does_not_silently_replace_a_parent_intermediate_value(strategy):
    parent = RunContext(context_id="p", run_id="r", routine_id="x")
    parent.set_variable("tmp", "parent", scope="intermediate")
    child = parent.create_child("sub")
    child.set_variable("tmp", "child")
    try:
        parent.merge_child(child, default=strategy)
    except MergeConflict:
        pass
    assert parent.get("tmp") == "parent"
