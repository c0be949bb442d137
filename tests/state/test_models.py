"""Unit tests of the RunContext model: limits, names, JSON-only values, sensitivity, children, exports.

Pure logic: no servers are used (none of conftest's fixtures is requested).
"""

from __future__ import annotations

import copy
import json
import math

import pytest

from state.errors import InvalidValue, LimitExceeded, SensitivityViolation
from state.limits import canonical_json, check_name
from state.models import (
    ContextVariable,
    DataSensitivity,
    ExportDeclaration,
    ExportDestination,
    ResourceLimits,
    RunContext,
    RunContextInit,
)

PUBLIC, INTERNAL, CONFIDENTIAL, SECRET = (
    DataSensitivity.PUBLIC,
    DataSensitivity.INTERNAL,
    DataSensitivity.CONFIDENTIAL,
    DataSensitivity.SECRET,
)


def make_ctx(**limits: int) -> RunContext:
    return RunContext(context_id="ctx-1", run_id="run-1", routine_id="routine-a", limits=ResourceLimits(**limits))


def snapshot(ctx: RunContext) -> dict:
    return copy.deepcopy(ctx.model_dump())


def json_bytes(value: object) -> int:
    return len(canonical_json(value).encode())


def assert_limit(exc: LimitExceeded, *, variable: str, limit: str, size: int, maximum: int) -> None:
    assert (exc.variable, exc.limit, exc.size, exc.maximum) == (variable, limit, size, maximum)
    message = str(exc)
    assert variable in message and limit in message and str(size) in message and str(maximum) in message
    assert exc.code == "LIMIT_EXCEEDED"


# ---- max_value_bytes ------------------------------------------------------------------------


def test_value_of_exactly_max_value_bytes_is_accepted():
    ctx = make_ctx(max_value_bytes=20)
    ctx.set_variable("v", "x" * 18)  # 18 characters + 2 quotes = 20 bytes
    assert ctx.get("v") == "x" * 18


def test_value_over_max_value_bytes_is_refused_with_fields_and_context_unchanged():
    ctx = make_ctx(max_value_bytes=20)
    ctx.set_variable("keep", 1, written_at=10.0)
    ctx.set_variable("big", "small", written_at=11.0)
    before = snapshot(ctx)

    with pytest.raises(LimitExceeded) as info:
        ctx.set_variable("big", "x" * 19, sensitivity=SECRET)

    assert_limit(info.value, variable="big", limit="max_value_bytes", size=21, maximum=20)
    assert snapshot(ctx) == before
    assert ctx.get("big") == "small"
    assert ctx.sensitivity_of("big") is PUBLIC


def test_value_size_is_counted_in_utf8_bytes_of_canonical_json():
    ctx = make_ctx(max_value_bytes=20)
    ctx.set_variable("ok", "é" * 9)  # 9 * 2 bytes + 2 quotes = 20
    with pytest.raises(LimitExceeded) as info:
        ctx.set_variable("too_big", "é" * 10)
    assert_limit(info.value, variable="too_big", limit="max_value_bytes", size=22, maximum=20)
    # canonical JSON has no spaces: {"a":[1,2]} is 11 bytes whatever the caller's formatting
    ctx.set_variable("compact", {"a": [1, 2]})
    assert json_bytes({"a": [1, 2]}) == 11


def test_intermediate_values_obey_max_value_bytes_too():
    ctx = make_ctx(max_value_bytes=10)
    before = snapshot(ctx)
    with pytest.raises(LimitExceeded) as info:
        ctx.set_variable("scratch", [1] * 10, scope="intermediate")  # [1,1,...] = 21 bytes
    assert_limit(info.value, variable="scratch", limit="max_value_bytes", size=21, maximum=10)
    assert snapshot(ctx) == before


# ---- max_variables --------------------------------------------------------------------------


def test_max_variables_refuses_the_extra_variable_with_fields_and_context_unchanged():
    ctx = make_ctx(max_variables=2)
    ctx.set_variable("a", 1)
    ctx.set_variable("b", 2)
    before = snapshot(ctx)

    with pytest.raises(LimitExceeded) as info:
        ctx.set_variable("c", 3)

    assert_limit(info.value, variable="c", limit="max_variables", size=3, maximum=2)
    assert snapshot(ctx) == before
    assert "c" not in ctx.variables


def test_max_variables_allows_updates_and_frees_a_slot_on_delete():
    ctx = make_ctx(max_variables=2)
    ctx.set_variable("a", 1)
    ctx.set_variable("b", 2)
    ctx.set_variable("a", 10)  # an update is not a new variable
    ctx.set_variable("b", 20, scope="intermediate")  # moving scope is not a new variable either
    assert ctx.get("a") == 10 and ctx.get("b") == 20
    ctx.delete_variable("a")
    ctx.set_variable("c", 3)
    assert ctx.variables == {"c": 3} and ctx.intermediate == {"b": 20}


def test_intermediate_variables_count_towards_max_variables():
    ctx = make_ctx(max_variables=1)
    ctx.set_variable("tmp", 1, scope="intermediate")
    with pytest.raises(LimitExceeded) as info:
        ctx.set_variable("a", 1)
    assert_limit(info.value, variable="a", limit="max_variables", size=2, maximum=1)


# ---- max_context_bytes ----------------------------------------------------------------------


def test_max_context_bytes_refuses_the_write_that_overflows_with_fields_and_context_unchanged():
    ctx = make_ctx(max_context_bytes=30)
    for name in ("a", "b", "c"):
        ctx.set_variable(name, "x" * 8)  # 10 bytes each: exactly 30 in total
    before = snapshot(ctx)

    with pytest.raises(LimitExceeded) as info:
        ctx.set_variable("d", 1)

    assert_limit(info.value, variable="d", limit="max_context_bytes", size=31, maximum=30)
    assert snapshot(ctx) == before


def test_max_context_bytes_counts_a_replaced_value_once():
    ctx = make_ctx(max_context_bytes=30)
    for name in ("a", "b", "c"):
        ctx.set_variable(name, "x" * 8)
    before = snapshot(ctx)
    with pytest.raises(LimitExceeded) as info:
        ctx.set_variable("a", "x" * 9)  # 11 instead of 10: 31
    assert_limit(info.value, variable="a", limit="max_context_bytes", size=31, maximum=30)
    assert snapshot(ctx) == before
    ctx.set_variable("a", "x" * 7)  # 9 instead of 10: 29
    ctx.set_variable("d", 1)  # 30 again
    assert ctx.get("a") == "x" * 7 and ctx.get("d") == 1


def test_intermediate_bytes_count_towards_max_context_bytes():
    ctx = make_ctx(max_context_bytes=20)
    ctx.set_variable("scratch", "x" * 8, scope="intermediate")  # 10
    ctx.set_variable("a", "x" * 8)  # 20
    with pytest.raises(LimitExceeded) as info:
        ctx.set_variable("b", 0)
    assert_limit(info.value, variable="b", limit="max_context_bytes", size=21, maximum=20)


def test_refused_write_leaves_the_size_accounting_intact():
    ctx = make_ctx(max_context_bytes=30, max_value_bytes=25)
    ctx.set_variable("a", "x" * 8)  # 10
    with pytest.raises(LimitExceeded):
        ctx.set_variable("b", "x" * 30)  # over max_value_bytes
    with pytest.raises(LimitExceeded):
        ctx.set_variable("b", "x" * 21)  # 23 bytes: fits a value, but 33 in total
    ctx.set_variable("b", "x" * 18)  # 20 bytes: exactly 30 in total
    with pytest.raises(LimitExceeded) as info:
        ctx.set_variable("c", None)
    assert_limit(info.value, variable="c", limit="max_context_bytes", size=34, maximum=30)


def test_limits_are_checked_for_contexts_built_with_variables():
    ctx = RunContext(
        context_id="c", run_id="r", routine_id="x", variables={"a": "x" * 8}, limits=ResourceLimits(max_context_bytes=15)
    )
    with pytest.raises(LimitExceeded) as info:
        ctx.set_variable("b", "x" * 4)  # 10 + 6
    assert_limit(info.value, variable="b", limit="max_context_bytes", size=16, maximum=15)


# ---- set_many -------------------------------------------------------------------------------


def test_set_many_sets_all_values_and_write_times():
    ctx = make_ctx()
    ctx.set_many({"a": 1, "b": {"c": [1, 2]}}, written_at={"a": 5.0, "b": 6.0})
    assert ctx.variables == {"a": 1, "b": {"c": [1, 2]}}
    assert ctx.written_at == {"a": 5.0, "b": 6.0}


@pytest.mark.parametrize(
    "limits, values, expected",
    [
        (dict(max_value_bytes=5), {"a": 1, "b": "toolong"}, ("b", "max_value_bytes", 9, 5)),
        (dict(max_variables=3), {"a": 1, "b": 2, "c": 3}, ("a", "max_variables", 4, 3)),
        (dict(max_context_bytes=12), {"a": "x" * 5, "b": "x" * 5}, ("a", "max_context_bytes", 15, 12)),
    ],
    ids=["max_value_bytes", "max_variables", "max_context_bytes"],
)
def test_set_many_is_all_or_nothing_on_limits(limits, values, expected):
    ctx = make_ctx(**limits)
    ctx.set_variable("keep", 0)  # 1 byte, 1 variable
    before = snapshot(ctx)
    with pytest.raises(LimitExceeded) as info:
        ctx.set_many(values)
    variable, limit, size, maximum = expected
    assert (info.value.limit, info.value.size, info.value.maximum) == (limit, size, maximum)
    assert info.value.variable == variable
    assert snapshot(ctx) == before


@pytest.mark.parametrize("bad", [{"ok": 1, "bad name": 2}, {"ok": 1, "bad": {1, 2}}, {"ok": 1, "bad": math.nan}])
def test_set_many_is_all_or_nothing_on_invalid_names_and_values(bad):
    ctx = make_ctx()
    ctx.set_variable("keep", 0)
    before = snapshot(ctx)
    with pytest.raises(InvalidValue):
        ctx.set_many(bad)
    assert snapshot(ctx) == before


# ---- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "_", "_x", "A1", "a.b-c_d", "x" * 200, "Z9.-_"])
def test_valid_names_are_accepted(name):
    ctx = make_ctx()
    ctx.set_variable(name, 1)
    assert ctx.get(name) == 1
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "1a", "-a", ".a", "a b", "a/b", "a:b", "x" * 201, "é", "a$", " a", "a\t"], ids=repr
)
def test_invalid_names_are_refused_and_change_nothing(name):
    ctx = make_ctx()
    ctx.set_variable("keep", 1)
    before = snapshot(ctx)
    with pytest.raises(InvalidValue) as info:
        ctx.set_variable(name, 1)
    assert repr(name) in str(info.value)
    with pytest.raises(InvalidValue):
        ctx.set_variable(name, 1, scope="intermediate")
    with pytest.raises(InvalidValue):
        ctx.mark_for_export(name, ExportDestination.PERSISTENT)
    assert snapshot(ctx) == before


@pytest.mark.parametrize("name", [None, 1, b"a"], ids=repr)
def test_non_string_names_are_refused(name):
    with pytest.raises(InvalidValue):
        make_ctx().set_variable(name, 1)


def test_name_with_trailing_newline_is_refused():
    ctx = make_ctx()
    with pytest.raises(InvalidValue):
        ctx.set_variable("a\n", 1)
    assert ctx.variables == {}


def test_unknown_scope_is_refused():
    ctx = make_ctx()
    with pytest.raises(InvalidValue):
        ctx.set_variable("a", 1, scope="globals")  # type: ignore[arg-type]
    assert ctx.variables == {} and ctx.intermediate == {}


# ---- JSON-only values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -7, 2**70, 1.5, "", "text é ✓", [], {}, [1, "a", None, [True]], {"a": {"b": [1, {"c": None}]}}],
    ids=repr,
)
def test_json_values_are_stored_as_given(value):
    ctx = make_ctx()
    ctx.set_variable("v", value)
    assert ctx.get("v") == value
    assert type(ctx.get("v")) is type(value)


def test_stored_value_is_a_copy_of_the_callers_object():
    ctx = make_ctx()
    value = {"items": [1, 2], "nested": {"k": "v"}}
    ctx.set_variable("v", value)
    value["items"].append(3)
    value["nested"]["k"] = "changed"
    assert ctx.get("v") == {"items": [1, 2], "nested": {"k": "v"}}


class _Opaque:
    pass


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        frozenset(),
        _Opaque(),
        object(),
        math.nan,
        math.inf,
        -math.inf,
        b"bytes",
        {"nested": [1, math.nan]},
        {"nested": {"deep": {3}}},
        "\ud800",  # lone surrogate: not encodable as UTF-8
        len,
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, float) else repr(v),
)
def test_non_json_values_are_refused_and_change_nothing(value):
    ctx = make_ctx()
    ctx.set_variable("v", "before", sensitivity=INTERNAL, written_at=1.0)
    before = snapshot(ctx)
    with pytest.raises(InvalidValue) as info:
        ctx.set_variable("v", value)
    assert "'v'" in str(info.value)
    with pytest.raises(InvalidValue):
        ctx.set_variable("other", value, scope="intermediate")
    assert snapshot(ctx) == before


@pytest.mark.parametrize("value", [{1: "a"}, {None: 1}, {True: 1}, {"ok": {2.5: "x"}}], ids=repr)
def test_dicts_with_non_string_keys_are_refused(value):
    ctx = make_ctx()
    with pytest.raises(InvalidValue):
        ctx.set_variable("v", value)


def test_tuple_values_are_refused_or_stored_as_lists():
    ctx = make_ctx()
    try:
        ctx.set_variable("v", (1, 2))
    except InvalidValue:
        return
    assert ctx.get("v") == [1, 2]


# ---- sensitivity ----------------------------------------------------------------------------


def test_sensitivity_levels_are_ordered_and_masked_from_confidential():
    assert [level.rank for level in (PUBLIC, INTERNAL, CONFIDENTIAL, SECRET)] == [0, 1, 2, 3]
    assert DataSensitivity.highest(INTERNAL, SECRET, PUBLIC) is SECRET
    assert DataSensitivity.highest(CONFIDENTIAL, INTERNAL) is CONFIDENTIAL
    assert [level.masked for level in (PUBLIC, INTERNAL, CONFIDENTIAL, SECRET)] == [False, False, True, True]


def test_sensitivity_defaults_to_public_and_can_be_raised():
    ctx = make_ctx()
    ctx.set_variable("a", 1)
    assert ctx.sensitivity_of("a") is PUBLIC
    ctx.set_variable("a", 2, sensitivity=INTERNAL)
    ctx.set_variable("a", 3, sensitivity="confidential")
    assert ctx.sensitivity_of("a") is CONFIDENTIAL
    ctx.set_variable("a", 4)  # no level given: keeps the current one
    assert ctx.sensitivity_of("a") is CONFIDENTIAL
    assert ctx.variable("a") == ContextVariable(name="a", value=4, sensitivity=CONFIDENTIAL, scope="variables")


@pytest.mark.parametrize("lower", [PUBLIC, INTERNAL, CONFIDENTIAL, "public"])
def test_sensitivity_cannot_be_lowered_and_the_refusal_changes_nothing(lower):
    ctx = make_ctx()
    ctx.set_variable("token", "s3cr3t", sensitivity=SECRET, written_at=1.0)
    before = snapshot(ctx)
    with pytest.raises(SensitivityViolation) as info:
        ctx.set_variable("token", "other", sensitivity=lower)
    assert "'token'" in str(info.value)
    assert snapshot(ctx) == before
    ctx.set_variable("token", "same-level", sensitivity=SECRET)  # equal is not lower
    assert ctx.get("token") == "same-level"


def test_sensitivity_cannot_be_lowered_through_another_scope():
    ctx = make_ctx()
    ctx.set_variable("token", "x", sensitivity=CONFIDENTIAL)
    with pytest.raises(SensitivityViolation):
        ctx.set_variable("token", "x", sensitivity=PUBLIC, scope="intermediate")
    ctx.set_variable("token", "y", scope="intermediate")
    assert ctx.sensitivity_of("token") is CONFIDENTIAL and ctx.intermediate == {"token": "y"}


# ---- masked_variables -----------------------------------------------------------------------


def test_masked_variables_hides_confidential_and_secret_values_only():
    ctx = make_ctx()
    ctx.set_variable("pub", "visible")
    ctx.set_variable("inner", {"n": 1}, sensitivity=INTERNAL)
    ctx.set_variable("conf", "hidden-1", sensitivity=CONFIDENTIAL)
    ctx.set_variable("key", {"api": "hidden-2"}, sensitivity=SECRET)
    masked = ctx.masked_variables()
    assert masked["pub"] == "visible" and masked["inner"] == {"n": 1}
    assert set(masked) == {"pub", "inner", "conf", "key"}
    assert "hidden-1" not in repr(masked) and "hidden-2" not in repr(masked)
    assert masked["conf"] == masked["key"] == "***"
    # the context itself still holds the values
    assert ctx.get("conf") == "hidden-1" and ctx.get("key") == {"api": "hidden-2"}


# ---- create_child ---------------------------------------------------------------------------


def _parent() -> RunContext:
    parent = make_ctx()
    parent.set_variable("cfg", {"retries": 3, "opts": {"fast": True}}, sensitivity=INTERNAL, written_at=5.0)
    parent.set_variable("token", "s3cr3t", sensitivity=SECRET)
    parent.set_variable("other", [1, 2])
    parent.set_variable("scratch", 1, scope="intermediate")
    return parent


def test_child_gets_only_the_declared_variables_with_their_sensitivity():
    parent = _parent()
    before = snapshot(parent)
    child = parent.create_child("sub-routine", inherit=["cfg", "token", "cfg"])
    assert child.variables == {"cfg": {"retries": 3, "opts": {"fast": True}}, "token": "s3cr3t"}
    assert child.intermediate == {}
    assert child.get("other") is None and child.get("scratch") is None
    assert child.sensitivity_of("cfg") is INTERNAL and child.sensitivity_of("token") is SECRET
    assert (child.parent_id, child.run_id, child.routine_id, child.depth) == ("ctx-1", "run-1", "sub-routine", 1)
    assert child.limits == parent.limits
    assert snapshot(parent) == before


def test_child_inherits_nothing_by_default():
    child = _parent().create_child("sub")
    assert child.variables == {} and child.intermediate == {}


def test_child_ids_are_distinct_unless_given():
    parent = _parent()
    a, b = parent.create_child("sub"), parent.create_child("sub")
    assert a.context_id != b.context_id and parent.context_id not in (a.context_id, b.context_id)
    assert parent.create_child("sub", context_id="fixed").context_id == "fixed"


def test_child_can_get_its_own_limits():
    parent = _parent()
    child = parent.create_child("sub", limits=ResourceLimits(max_variables=1))
    assert child.limits.max_variables == 1
    with pytest.raises(LimitExceeded):
        child.set_variable("a", 1)
        child.set_variable("b", 2)


def test_child_changes_do_not_reach_the_parent():
    parent = _parent()
    before = snapshot(parent)
    child = parent.create_child("sub", inherit=["cfg", "other"])
    child.set_variable("cfg", {"retries": 0})
    child.get("other").append(3)  # in-place change of the child's copy
    child.set_variable("new", "x")
    child.delete_variable("other")
    assert snapshot(parent) == before


def test_mutating_a_nested_dict_in_the_child_does_not_change_the_parent():
    parent = _parent()
    child = parent.create_child("sub", inherit=["cfg"])
    child.get("cfg")["opts"]["fast"] = False
    child.variables["cfg"]["retries"] = 99
    assert parent.get("cfg") == {"retries": 3, "opts": {"fast": True}}
    assert child.get("cfg") == {"retries": 99, "opts": {"fast": False}}


def test_parent_changes_after_creation_do_not_reach_the_child():
    parent = _parent()
    child = parent.create_child("sub", inherit=["cfg"])
    parent.get("cfg")["opts"]["fast"] = False
    parent.set_variable("cfg", {"retries": 7})
    parent.set_variable("late", 1)
    assert child.variables == {"cfg": {"retries": 3, "opts": {"fast": True}}}


@pytest.mark.parametrize("lower", [PUBLIC, INTERNAL, CONFIDENTIAL])
def test_child_cannot_lower_an_inherited_sensitivity(lower):
    child = _parent().create_child("sub", inherit=["token"])
    before = snapshot(child)
    with pytest.raises(SensitivityViolation):
        child.set_variable("token", "leaked", sensitivity=lower)
    assert snapshot(child) == before


def test_child_cannot_lower_an_inherited_sensitivity_by_deleting_and_recreating():
    child = _parent().create_child("sub", inherit=["token"])
    child.delete_variable("token")
    with pytest.raises(SensitivityViolation):
        child.set_variable("token", "leaked", sensitivity=PUBLIC)


def test_child_may_raise_an_inherited_sensitivity():
    parent = _parent()
    child = parent.create_child("sub", inherit=["cfg"])
    child.set_variable("cfg", {"retries": 1}, sensitivity=SECRET)
    assert child.sensitivity_of("cfg") is SECRET
    assert parent.sensitivity_of("cfg") is INTERNAL


def test_children_nest_up_to_max_child_depth_then_limit_exceeded():
    root = RunContext(context_id="root", run_id="r", routine_id="x", limits=ResourceLimits(max_child_depth=2))
    first = root.create_child("one")
    second = first.create_child("two")
    assert (first.depth, second.depth) == (1, 2)
    assert second.parent_id == first.context_id
    before = snapshot(second)
    with pytest.raises(LimitExceeded) as info:
        second.create_child("three")
    assert info.value.limit == "max_child_depth"
    assert (info.value.size, info.value.maximum) == (3, 2)
    assert "max_child_depth" in str(info.value)
    assert snapshot(second) == before


def test_max_child_depth_zero_allows_no_child():
    root = RunContext(context_id="root", run_id="r", routine_id="x", limits=ResourceLimits(max_child_depth=0))
    with pytest.raises(LimitExceeded) as info:
        root.create_child("one")
    assert (info.value.limit, info.value.size, info.value.maximum) == ("max_child_depth", 1, 0)


@pytest.mark.parametrize("missing", ["nope", "scratch"], ids=["unknown", "intermediate-only"])
def test_inheriting_a_name_that_is_not_a_variable_is_refused_naming_it(missing):
    parent = _parent()
    before = snapshot(parent)
    with pytest.raises(InvalidValue) as info:
        parent.create_child("sub", inherit=["cfg", missing])
    assert repr(missing) in str(info.value)
    assert "'cfg'" not in str(info.value)
    assert snapshot(parent) == before


def test_parent_in_place_change_after_creation_is_not_taken_for_a_child_change():
    parent = _parent()
    child = parent.create_child("sub", inherit=["cfg"])
    parent.get("cfg")["opts"]["fast"] = False
    assert child.child_changes() == {}
    parent.merge_child(child)
    assert parent.get("cfg") == {"retries": 3, "opts": {"fast": False}}


def test_child_records_what_it_inherited_so_only_changes_come_back():
    parent = _parent()
    child = parent.create_child("sub", inherit=["cfg", "other"])
    assert child.child_changes() == {}
    child.set_variable("other", [1, 2])  # same value: not a change
    child.get("cfg")["opts"]["fast"] = False  # in-place change is a change
    child.set_variable("new", None)
    assert child.child_changes() == {"cfg": {"retries": 3, "opts": {"fast": False}}, "new": None}


# ---- exports --------------------------------------------------------------------------------


def test_mark_for_export_declares_blackboard_and_persistent_exports():
    ctx = make_ctx()
    bb = ctx.mark_for_export("summary", ExportDestination.BLACKBOARD, scope="swarm:42", key="run_summary")
    persistent = ctx.mark_for_export("report", "persistent")
    assert bb == ExportDeclaration(
        variable="summary", destination=ExportDestination.BLACKBOARD, scope="swarm:42", key="run_summary"
    )
    assert bb.export_key == "run_summary"
    assert persistent.destination is ExportDestination.PERSISTENT
    assert persistent.scope == "default" and persistent.export_key == "report"
    assert ctx.exports == [bb, persistent]


def test_duplicate_exports_are_not_added_twice():
    ctx = make_ctx()
    ctx.mark_for_export("summary", "blackboard", scope="team:ops")
    ctx.mark_for_export("summary", ExportDestination.BLACKBOARD, scope="team:ops")
    assert len(ctx.exports) == 1
    ctx.mark_for_export("summary", "blackboard", scope="swarm:1")  # another scope is another export
    ctx.mark_for_export("summary", "persistent")
    assert [(e.destination.value, e.scope) for e in ctx.exports] == [
        ("blackboard", "team:ops"),
        ("blackboard", "swarm:1"),
        ("persistent", "default"),
    ]


def test_unknown_export_destination_is_refused():
    ctx = make_ctx()
    with pytest.raises(ValueError):
        ctx.mark_for_export("summary", "email")
    assert ctx.exports == []


# ---- from_init ------------------------------------------------------------------------------


def test_from_init_builds_a_context_with_plain_and_context_variable_values():
    init = RunContextInit(
        run_id="run-9",
        routine_id="routine-b",
        variables={
            "plain": {"a": [1, 2]},
            "marked": "x",
            "wrapped": ContextVariable(name="wrapped", value={"k": "v"}, sensitivity=SECRET),
            "wrapped_internal": ContextVariable(name="wrapped_internal", value=[1], sensitivity="internal"),
        },
        sensitivity_map={"marked": CONFIDENTIAL, "temp": SECRET},
        intermediate={"temp": 42},
        exports=[ExportDeclaration(variable="plain", destination=ExportDestination.PERSISTENT)],
        limits=ResourceLimits(max_variables=10),
    )
    ctx = RunContext.from_init(init)
    assert (ctx.context_id, ctx.run_id, ctx.routine_id, ctx.parent_id, ctx.depth) == (
        "run-9",
        "run-9",
        "routine-b",
        None,
        0,
    )
    assert ctx.variables == {"plain": {"a": [1, 2]}, "marked": "x", "wrapped": {"k": "v"}, "wrapped_internal": [1]}
    assert ctx.intermediate == {"temp": 42}
    assert ctx.sensitivity_of("plain") is PUBLIC
    assert ctx.sensitivity_of("marked") is CONFIDENTIAL
    assert ctx.sensitivity_of("wrapped") is SECRET
    assert ctx.sensitivity_of("wrapped_internal") is INTERNAL
    assert ctx.sensitivity_of("temp") is SECRET
    assert ctx.exports == init.exports
    assert ctx.limits.max_variables == 10
    assert ctx.masked_variables() == {"plain": {"a": [1, 2]}, "marked": "***", "wrapped": "***", "wrapped_internal": [1]}


def test_from_init_uses_the_given_context_id():
    ctx = RunContext.from_init(RunContextInit(run_id="run-9", routine_id="r", context_id="ctx-77"))
    assert ctx.context_id == "ctx-77" and ctx.run_id == "run-9"


def test_from_init_copies_the_init_values():
    values = {"a": {"nested": [1]}}
    init = RunContextInit(run_id="r", routine_id="x", variables=values)
    ctx = RunContext.from_init(init)
    init.variables["a"]["nested"].append(2)
    assert ctx.get("a") == {"nested": [1]}


@pytest.mark.parametrize(
    "init_kwargs, error",
    [
        (dict(variables={"a": "x" * 20}, limits=ResourceLimits(max_value_bytes=10)), LimitExceeded),
        (dict(variables={"a": 1, "b": 2}, limits=ResourceLimits(max_variables=1)), LimitExceeded),
        (dict(variables={"bad name": 1}), InvalidValue),
        (dict(variables={"a": {1, 2}}), InvalidValue),
        (dict(variables={"a": ContextVariable(name="a", value=math.nan)}), InvalidValue),
    ],
    ids=["value-bytes", "variables", "name", "set", "nan-in-wrapper"],
)
def test_from_init_enforces_limits_names_and_json(init_kwargs, error):
    with pytest.raises(error):
        RunContext.from_init(RunContextInit(run_id="r", routine_id="x", **init_kwargs))


def test_from_init_never_lowers_a_sensitivity_declared_in_the_sensitivity_map():
    init = RunContextInit(
        run_id="r",
        routine_id="x",
        variables={"api_key": ContextVariable(name="api_key", value="s3cr3t")},
        sensitivity_map={"api_key": SECRET},
    )
    ctx = RunContext.from_init(init)
    assert ctx.sensitivity_of("api_key") is SECRET
    assert ctx.masked_variables() == {"api_key": "***"}


def test_from_init_honours_the_scope_of_a_context_variable():
    init = RunContextInit(
        run_id="r", routine_id="x", variables={"tmp": ContextVariable(name="tmp", value=1, scope="intermediate")}
    )
    ctx = RunContext.from_init(init)
    assert ctx.intermediate == {"tmp": 1} and ctx.variables == {}


def test_applied_steps_lookup_follows_marks_copies_and_replacements() -> None:
    ctx = RunContext.from_init(RunContextInit(run_id="r", routine_id="x"))
    for n in range(200):  # past the folding of recent ids into the frozen set
        ctx.mark_applied(f"s{n}")
    assert ctx.has_applied("s0") and ctx.has_applied("s199") and not ctx.has_applied("s200")
    copy_ = ctx.working_copy()
    copy_.mark_applied("s200")
    assert copy_.has_applied("s200") and not ctx.has_applied("s200")  # the base is not changed
    assert ctx.applied_steps == [f"s{n}" for n in range(200)]
    ctx.applied_steps = ["other"]  # replaced wholesale: the lookup is rebuilt, never stale
    assert ctx.has_applied("other") and not ctx.has_applied("s0")
    follower = RunContext.from_init(RunContextInit(run_id="r", routine_id="x"))
    follower.continues(copy_, ["s201"])
    assert follower.applied_steps == [*copy_.applied_steps, "s201"] and follower.has_applied("s150")


def test_a_context_remembers_the_steps_of_its_last_commits_while_they_follow_one_another() -> None:
    from state.models import LAST_STEPS_KEPT

    ctx = RunContext.from_init(RunContextInit(run_id="r", routine_id="x"))
    ctx.version = 1
    assert ctx.last_steps() == ()  # as read from a tier: nothing known
    for version in range(2, 4 + LAST_STEPS_KEPT):
        ctx = ctx.working_copy()
        ctx.version = version
        ctx.note_step_commit(f"s{version}")
    assert ctx.last_steps() == tuple(f"s{v}" for v in range(4, 4 + LAST_STEPS_KEPT))  # the last LAST_STEPS_KEPT
    later = ctx.working_copy()
    later.version += 1  # a commit without a step (an edit): what it knew no longer leads to this version
    assert later.last_steps() == ()
    later = later.working_copy()
    later.version += 1
    later.note_step_commit("after")
    assert later.last_steps() == ("after",)


def test_copies_share_applied_steps_and_a_retried_commit_never_sees_its_sibling_s_step() -> None:
    from state.applied import AppliedSteps

    base = RunContext.from_init(RunContextInit(run_id="r", routine_id="x"))
    for n in range(1000):
        base.mark_applied(f"s{n}")
    first, second = base.working_copy(), base.working_copy()  # a commit, then its retry, from one version
    first.mark_applied("mine")
    second.mark_applied("theirs")
    assert first.has_applied("mine") and not first.has_applied("theirs")
    assert second.has_applied("theirs") and not second.has_applied("mine")
    assert not base.has_applied("mine") and not base.has_applied("theirs") and len(base.applied_steps) == 1000
    assert list(second.applied_steps)[-2:] == ["s999", "theirs"] and second.applied_steps[-1] == "theirs"
    # Stored and compared as a list, whatever it shares.
    assert second.model_dump()["applied_steps"] == [f"s{n}" for n in range(1000)] + ["theirs"]
    assert json.loads(second.model_dump_json())["applied_steps"][-1] == "theirs"
    again = RunContext.model_validate(second.model_dump())
    assert isinstance(again.applied_steps, AppliedSteps) and again.applied_steps == second.applied_steps
    assert copy.deepcopy(second).applied_steps == second.applied_steps
