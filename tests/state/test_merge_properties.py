"""Property tests of conflict resolution (hypothesis): determinism, no invented values, keys, FAIL, deep merge."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from state.conflicts import deep_merge, resolve_variable_conflicts
from state.errors import MergeConflict
from state.limits import canonical_json
from state.models import ConflictResolutionStrategy as S
from state.models import RunContext

settings.register_profile("merge-properties", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROPS = settings.get_profile("merge-properties")

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")  # what PostgreSQL can store
LEAVES = st.none() | st.booleans() | st.integers(min_value=-5, max_value=5) | st.integers() | st.text(TEXT, max_size=6)
JSON = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(TEXT, max_size=4), children, max_size=4),
    max_leaves=12,
)
OBJECTS = st.dictionaries(st.text(TEXT, max_size=3), JSON, max_size=5)
STRATEGIES = st.sampled_from(list(S))
NON_FAIL = st.sampled_from([s for s in S if s is not S.FAIL])
TIMES = st.sampled_from([0.0, 1.0, 2.0, 3.0])


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON, which is what a user compares (1 and true are different JSON values)."""
    return canonical_json(a) == canonical_json(b)


def reordered(value: Any) -> Any:
    """The same JSON value with every mapping's keys inserted in reverse order."""
    if isinstance(value, dict):
        return {key: reordered(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(item) for item in value]
    return value


def conflicting(current: dict, incoming: dict) -> set[str]:
    return {name for name in incoming if name in current and not same_json(current[name], incoming[name])}


@st.composite
def sides(draw: st.DrawFn, values: st.SearchStrategy = JSON) -> tuple[dict, dict]:
    """A current and an incoming mapping over a shared pool of names, often overlapping, sometimes equal."""
    names = draw(st.lists(NAMES, unique=True, max_size=8))
    current: dict[str, Any] = {}
    incoming: dict[str, Any] = {}
    for name in names:
        where = draw(st.sampled_from(["current", "incoming", "both-equal", "both-differ"]))
        if where in ("current", "both-equal", "both-differ"):
            current[name] = draw(values)
        if where == "incoming":
            incoming[name] = draw(values)
        elif where == "both-equal":
            incoming[name] = copy.deepcopy(current[name])
        elif where == "both-differ":
            incoming[name] = draw(values)
    return current, incoming


@st.composite
def merge_inputs(draw: st.DrawFn) -> dict[str, Any]:
    current, incoming = draw(sides())
    names = sorted(set(current) | set(incoming))
    per_variable = draw(st.dictionaries(st.sampled_from(names), STRATEGIES, max_size=3)) if names else {}
    return dict(
        current=current,
        incoming=incoming,
        default=draw(STRATEGIES),
        per_variable=per_variable,
        current_written_at=draw(st.dictionaries(st.sampled_from(names), TIMES)) if names else {},
        incoming_written_at=draw(st.dictionaries(st.sampled_from(names), TIMES)) if names else {},
    )


def run(inputs: dict[str, Any]) -> tuple[str, Any]:
    """The outcome of a merge as comparable data: its values and conflicts, or the variables FAIL named."""
    try:
        result = resolve_variable_conflicts(**copy.deepcopy(inputs))
    except MergeConflict as exc:
        return "refused", sorted(exc.variables)
    return "merged", (result.values, result.conflicts)


# ---- determinism ----------------------------------------------------------------------------


@PROPS
@given(merge_inputs())
def test_merging_is_deterministic(inputs):
    first, second = run(inputs), run(inputs)
    assert first[0] == second[0]
    if first[0] == "refused":
        assert first[1] == second[1]
    else:
        (values_1, conflicts_1), (values_2, conflicts_2) = first[1], second[1]
        assert canonical_json(values_1) == canonical_json(values_2)
        assert [canonical_json(c.model_dump(mode="json")) for c in conflicts_1] == [
            canonical_json(c.model_dump(mode="json")) for c in conflicts_2
        ]


@PROPS
@given(merge_inputs())
def test_merging_does_not_depend_on_the_insertion_order_of_keys(inputs):
    shuffled = {key: reordered(value) for key, value in inputs.items()}
    outcome, other = run(inputs), run(shuffled)
    assert outcome[0] == other[0]
    if outcome[0] == "refused":
        assert outcome[1] == other[1]
    else:
        (values, conflicts), (values_r, conflicts_r) = outcome[1], other[1]
        assert canonical_json(values) == canonical_json(values_r)
        assert [canonical_json(c.model_dump(mode="json")) for c in conflicts] == [
            canonical_json(c.model_dump(mode="json")) for c in conflicts_r
        ]


@PROPS
@given(merge_inputs())
def test_merging_does_not_change_its_inputs(inputs):
    original = copy.deepcopy(inputs)
    try:
        resolve_variable_conflicts(**inputs)
    except MergeConflict:
        pass
    assert canonical_json(inputs["current"]) == canonical_json(original["current"])
    assert canonical_json(inputs["incoming"]) == canonical_json(original["incoming"])


# ---- values and keys ------------------------------------------------------------------------


@PROPS
@given(sides(), st.sampled_from([S.PARENT_WINS, S.CHILD_WINS]))
def test_parent_wins_and_child_wins_never_invent_a_value(pair, strategy):
    current, incoming = pair
    result = resolve_variable_conflicts(current, incoming, default=strategy)
    for name, value in result.values.items():
        candidates = [side[name] for side in (current, incoming) if name in side]
        assert any(same_json(value, candidate) for candidate in candidates), (name, value, candidates)


@PROPS
@given(sides())
def test_child_wins_takes_every_incoming_value(pair):
    current, incoming = pair
    result = resolve_variable_conflicts(current, incoming, default=S.CHILD_WINS)
    assert canonical_json(result.values) == canonical_json({**current, **incoming})
    assert sorted(c.name for c in result.conflicts) == sorted(conflicting(current, incoming))


@PROPS
@given(sides())
@example(({"n": 1}, {"n": True}))  # equal to Python, different as JSON: a conflict
@example(({"m": {"k": 0}}, {"m": {"k": False}}))
def test_parent_wins_keeps_every_current_value(pair):
    current, incoming = pair
    result = resolve_variable_conflicts(current, incoming, default=S.PARENT_WINS)
    assert canonical_json(result.values) == canonical_json({**incoming, **current})
    assert sorted(c.name for c in result.conflicts) == sorted(conflicting(current, incoming))


@PROPS
@given(sides(), NON_FAIL, st.dictionaries(NAMES, TIMES), st.dictionaries(NAMES, TIMES))
def test_merged_keys_are_the_union_of_both_sides(pair, strategy, current_at, incoming_at):
    current, incoming = pair
    result = resolve_variable_conflicts(
        current, incoming, default=strategy, current_written_at=current_at, incoming_written_at=incoming_at
    )
    assert set(result.values) == set(current) | set(incoming)
    # names only one side holds are taken as they are
    for name in set(current) - set(incoming):
        assert same_json(result.values[name], current[name])
    for name in set(incoming) - set(current):
        assert same_json(result.values[name], incoming[name])
    assert {c.name for c in result.conflicts} <= set(current) & set(incoming)
    assert all(c.strategy is strategy for c in result.conflicts)


# ---- FAIL -----------------------------------------------------------------------------------


@PROPS
@given(sides())
def test_fail_raises_iff_a_variable_conflicts(pair):
    current, incoming = pair
    expected = conflicting(current, incoming)
    try:
        result = resolve_variable_conflicts(current, incoming, default=S.FAIL)
    except MergeConflict as exc:
        assert expected, "refused without a conflicting variable"
        assert sorted(exc.variables) == sorted(expected)
    else:
        assert not expected, f"merged although {sorted(expected)} conflict"
        assert result.conflicts == []
        assert canonical_json(result.values) == canonical_json({**current, **incoming})


@PROPS
@given(sides())
def test_fail_with_base_raises_iff_both_sides_changed_a_variable(pair):
    base, incoming = pair
    # current: base with some of the incoming names changed by someone else
    current = {name: (["changed", value] if len(name) % 2 else value) for name, value in base.items()}
    both_changed = {name for name in conflicting(current, incoming) if not same_json(current[name], base[name])}
    try:
        resolve_variable_conflicts(current, incoming, default=S.FAIL, base=base)
    except MergeConflict as exc:
        assert sorted(exc.variables) == sorted(both_changed)
    else:
        assert not both_changed


@PROPS
@given(sides())
def test_merge_child_fail_leaves_the_parent_exactly_as_it_was(pair):
    parent_values, child_values = pair
    parent = RunContext(context_id="p", run_id="r", routine_id="x")
    parent.set_many(parent_values, written_at={name: 1.0 for name in parent_values})
    child = parent.create_child("sub")
    child.set_many(child_values, written_at={name: 2.0 for name in child_values})
    before = copy.deepcopy(parent.model_dump())
    expected = conflicting(parent_values, child_values)
    try:
        conflicts = parent.merge_child(child, default=S.FAIL)
    except MergeConflict as exc:
        assert sorted(exc.variables) == sorted(expected)
        assert parent.model_dump() == before
    else:
        assert not expected and conflicts == []
        assert canonical_json(parent.variables) == canonical_json({**parent_values, **child_values})


# ---- MERGE_OBJECTS --------------------------------------------------------------------------


def assert_deep_merged(current: Any, incoming: Any, merged: Any) -> None:
    if isinstance(current, dict) and isinstance(incoming, dict):
        assert isinstance(merged, dict)
        assert set(merged) == set(current) | set(incoming)
        for key in merged:
            if key in current and key in incoming:
                assert_deep_merged(current[key], incoming[key], merged[key])
            elif key in current:
                assert same_json(merged[key], current[key])
            else:
                assert same_json(merged[key], incoming[key])
    else:
        assert same_json(merged, incoming)


@PROPS
@given(OBJECTS, OBJECTS)
def test_deep_merge_of_two_mappings_holds_every_key_of_both(current, incoming):
    merged = deep_merge(current, incoming)
    assert set(merged) >= set(current) | set(incoming)
    assert_deep_merged(current, incoming, merged)


@PROPS
@given(sides(values=OBJECTS))
def test_merge_objects_strategy_keeps_every_key_of_both_mappings(pair):
    current, incoming = pair
    result = resolve_variable_conflicts(current, incoming, default=S.MERGE_OBJECTS)
    for name in set(current) & set(incoming):
        assert_deep_merged(current[name], incoming[name], result.values[name])
    for conflict in result.conflicts:
        assert same_json(conflict.resolved_value, result.values[conflict.name])
