"""Conditions (`when:`, tasks.expressions) and the routine language's loop, retry, time-limit and
failure fields (tasks.routine), as units: what is refused when a routine is loaded, and how.

- A `Condition` exists only for an expression that parsed and calls only CEL's own functions; a
  syntax error names line:column, an unknown function is named, an empty or over-long one refused.
- `evaluate` says true or false, or raises `ExpressionFailed` in one line naming the expression
  and the problem (a missing variable by name, a type mismatch, a value that is not a bool), and
  never a variable's value: the binding's own messages quote them.
- An expression cannot call out: no function of ours, no Python attribute, and a callable given as
  a variable is refused rather than called.
- `RetrySpec.delay_s`/`retries`, `ForEachStep.tolerated` (N and N%, exact).
- The model: `error_into` needs `on_failure: continue`, `tolerate_failures` is a count or a
  percentage of at most 100 (not a bool, not negative), `as`/`from` are the written names, YAML's
  `on:` key is the string "on", every refusal names the file and the place, and what loads comes
  back the same from its stored form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from state.errors import InvalidRoutine, RunctxError, StepFailed
from tasks.expressions import MAX_EXPRESSION_LENGTH, Condition, ExpressionFailed
from tasks.routine import (
    ActionStep,
    CollectSpec,
    ForEachStep,
    ParallelStep,
    RetrySpec,
    Routine,
    SubRoutineStep,
    load_routine,
    parse_routine,
    read_routine_file,
)

STEP = {"id": "s", "action": "set", "args": {"name": "v", "value": 1}}


def routine_with(step: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A routine whose second step is ``step`` (the first a plain action: places read steps[1])."""
    return {"name": "r", "steps": [STEP, step], **fields}


def refusal(definition: dict[str, Any]) -> str:
    with pytest.raises(InvalidRoutine) as caught:
        parse_routine(definition, source="r.yaml")
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# ---- Condition.parse --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "x > 1",
        "x > 1 && (y == 'a' || !z)",
        "size(items) > 0 && items.all(i, i > 0)",
        "items.exists(i, i == 'a') ? true : false",
        "items[0] == 1 && m['k'] == 2 && m.k == 2",  # indexing and field selection
        "'k' in m && 1 in items",
        "name.startsWith('a') && name.endsWith('z') && name.contains('m') && name.matches('^a')",
        "int(s) + 1 == 2 && double(n) > 0.5 && string(n) == '1' && type(n) == int",
        "timestamp('2020-01-01T00:00:00Z').getFullYear() == 2020 && duration('1s') < duration('2s')",
        "items.map(i, i * 2).filter(i, i > 2).size() == 1",
        "x >\n  1",  # an expression may span lines
    ],
)
def test_an_expression_of_cel_operators_and_functions_parses(source: str) -> None:
    condition = Condition.parse(source)
    assert condition.source == source
    assert str(condition) == source and repr(condition) == f"Condition({source!r})"


def test_a_condition_is_equal_to_another_of_the_same_source_and_lists_what_it_reads() -> None:
    first, second = Condition.parse("x > 1 && items.all(i, i > x)"), Condition.parse("x > 1 && items.all(i, i > x)")
    assert first == second and hash(first) == hash(second) and first != Condition.parse("x > 2")
    assert set(first.variables) == {"x", "items", "i"}  # the macro's own name included


@pytest.mark.parametrize(
    "source, place",
    [("x >", "at 1:4"), ("x > 1 &&", "at 1:9"), ("(x > 1", "at 1:7"), ("x &&\n  (", "at 2:4"), ("m.?k", "at 1:2")],
)
def test_a_syntax_error_is_refused_naming_line_and_column(source: str, place: str) -> None:
    with pytest.raises(ValueError) as caught:
        Condition.parse(source)
    message = str(caught.value)
    assert "\n" not in message and "is not valid CEL" in message and place in message, message
    assert len(message) < 400


@pytest.mark.parametrize(
    "source, function",
    [
        ("nosuch(x)", "nosuch"),
        ("x.upper() == 'A'", "upper"),
        ("__import__('os').system('true')", "__import__"),
        ("_foo_(x)", "_foo_"),  # shaped like an operator's name, but a function
        # what only the binding's opt-in Python stdlib has: accepted here, they would fail every evaluation
        ("max(items) > 1", "max"),
        ("name.lowerAscii() == 'a'", "lowerAscii"),
        ("name.split(',').size() > 1", "split"),
        ("bool(s)", "bool"),
    ],
)
def test_an_unknown_function_is_refused_by_name(source: str, function: str) -> None:
    with pytest.raises(ValueError, match=f"calls unknown function .*'{function}'"):
        Condition.parse(source)


@pytest.mark.parametrize("source", ["", "   ", "\n\t"])
def test_an_empty_expression_is_refused(source: str) -> None:
    with pytest.raises(ValueError, match="cannot be empty"):
        Condition.parse(source)


def test_an_expression_over_the_length_limit_is_refused() -> None:
    longest = "x == 1" + " " * (MAX_EXPRESSION_LENGTH - 6)
    assert Condition.parse(longest).evaluate({"x": 1}) is True
    with pytest.raises(ValueError, match=f"at most {MAX_EXPRESSION_LENGTH} characters"):
        Condition.parse(longest + " ")


# ---- Condition.evaluate -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, variables, expected",
    [
        ("x > 1", {"x": 2}, True),
        ("x > 1", {"x": 1}, False),
        ("x == 1.0", {"x": 1}, True),  # comparisons across int and double
        ("name == 'report.pdf'", {"name": "report.pdf"}, True),
        ("doc.pages > 10", {"doc": {"name": "a", "pages": 12}}, True),
        ("has(doc.pages)", {"doc": {"name": "a"}}, False),
        ("items.exists(i, i == 'large')", {"items": ["small", "large"]}, True),
        ("items.all(i, i == 'large')", {"items": ["small", "large"]}, False),
        ("size(items) == 0", {"items": []}, True),
        ("items[1] == 'b' && m['k'] == null", {"items": ["a", "b"], "m": {"k": None}}, True),
        ("!flag", {"flag": False}, True),
        ("x > 1", {"x": 2, "unused": object()}, True),  # a variable the expression does not name is not looked at
    ],
)
def test_evaluate_says_true_or_false(source: str, variables: dict[str, Any], expected: bool) -> None:
    assert Condition.parse(source).evaluate(variables) is expected


def failure(source: str, variables: dict[str, Any]) -> str:
    with pytest.raises(ExpressionFailed) as caught:
        Condition.parse(source).evaluate(variables)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(f"when {source!r}"), message
    return message


def test_a_missing_variable_fails_in_one_line_naming_it() -> None:
    message = failure("total > 1 && x > 1", {"x": 2})
    assert "no variable 'total'" in message, message
    assert isinstance(ExpressionFailed("m"), StepFailed) and isinstance(ExpressionFailed("m"), RunctxError)


@pytest.mark.parametrize(
    "source, variables, gave",
    [("x + 1", {"x": 1}, "an int"), ("x", {"x": "yes"}, "a string"), ("x", {"x": None}, "null"),
     ("items", {"items": [True]}, "a list"), ("m", {"m": {}}, "a map"), ("1.5", {}, "a double")],
)
def test_a_result_that_is_not_true_or_false_is_refused(source: str, variables: dict[str, Any], gave: str) -> None:
    assert f"gave {gave}, not true or false" in failure(source, variables)


@pytest.mark.parametrize(
    "source, variables, problem",
    [
        ("x > 'a'", {"x": 1}, "types do not fit"),
        ("x + 1.5 > 2.0", {"x": 1}, "types do not fit"),  # CEL does not convert int to double in arithmetic
        ("x && true", {"x": 1}, "types do not fit"),
        ("x.size() > 0", {"x": 1}, "size() does not take operands of these types"),
        ("m.k == 1", {"m": {"j": 1}}, "a map has no key 'k'"),
        ("items[3] == 1", {"items": [1]}, "out of the list's bounds"),
        ("x / 0 == 1", {"x": 1}, "division or modulo by zero"),
        ("int(s) == 1", {"s": "abc"}, "int() failed on its arguments"),
    ],
)
def test_an_expression_that_cannot_be_evaluated_fails_in_one_line(source: str, variables: dict[str, Any], problem: str) -> None:
    assert problem in failure(source, variables)


@pytest.mark.parametrize(
    "source",
    [
        "m[s] == 1",  # the missing key is the value of s
        "items[n] == 1",  # the index is the value of n
        "big + n > 0",  # the binding names an overflow's operands
        "duration(s) > duration('1s')",  # and a string that does not parse
        "s.matches(s + '[')",  # and a regex that does not compile
        "timestamp(s) > timestamp('2020-01-01T00:00:00Z')",
    ],
)
def test_a_failure_never_shows_a_variables_value(source: str) -> None:
    variables = {"s": "SECRETVALUE", "n": 987654321, "big": 2**63 - 1, "m": {"a": 1}, "items": [1]}
    message = failure(source, variables)
    assert "SECRETVALUE" not in message and "987654321" not in message and str(2**63 - 1) not in message, message


def test_an_expression_cannot_call_out() -> None:
    called: list[Any] = []

    def spy(*args: Any) -> bool:
        called.append(args)
        return True

    # Functions are CEL's own: a name that is no CEL function is refused when the routine is loaded ...
    for source in ("spy(1)", "x.spy()", "__import__('os')", "x.__class__.__name__ == 'str'"):
        try:
            Condition.parse(source).evaluate({"x": "a", "spy": spy})
        except (ValueError, ExpressionFailed):
            pass
    # ... and a callable among the variables is a value CEL cannot take, never a function: under a
    # function's name it is not even given (only the names the expression reads are).
    assert "variable 'spy' holds a value CEL cannot take" in failure("spy == 1", {"spy": spy})
    assert Condition.parse("size(x) == 1").evaluate({"x": "a", "size": spy}) is True
    # Python attributes are not fields: an object's attribute is out of reach, not read.
    failure("x.__class__ == 'str'", {"x": "a"})
    failure("x.real == 1", {"x": object()})
    assert called == []


# ---- RetrySpec, ForEachStep.tolerated ----------------------------------------------------------------


def test_retry_delay_grows_by_the_rate_and_stops_at_the_cap() -> None:
    retry = RetrySpec(max_attempts=10, backoff_s=1, backoff_rate=2, max_backoff_s=5)
    assert [retry.delay_s(attempt) for attempt in range(1, 6)] == [1, 2, 4, 5, 5]
    assert RetrySpec(max_attempts=3).delay_s(1) == 1.0  # the defaults: 1 s, doubling, at most 300 s
    assert RetrySpec(max_attempts=100, backoff_s=3600, backoff_rate=10, max_backoff_s=86400).delay_s(99) == 86400
    assert RetrySpec(max_attempts=3, backoff_s=0).delay_s(3) == 0


def test_retry_on_names_error_classes_or_any() -> None:
    assert RetrySpec(max_attempts=2).retries(["ValueError", "Exception"])  # `on` empty: any error
    narrow = RetrySpec(max_attempts=2, on=["ConnectionError", "Timeout"])
    assert narrow.retries(["ConnectionRefusedError", "ConnectionError", "OSError", "Exception"])  # a base named
    assert narrow.retries(["Timeout"])
    assert not narrow.retries(["ValueError", "Exception"])


@pytest.mark.parametrize(
    "tolerate, items, tolerated",
    [(0, 10, 0), (3, 2, 3), ("10%", 25, 2), ("10%", 30, 3), ("100%", 7, 7), ("0%", 5, 0), ("50%", 0, 0),
     ("0.57%", 10_000, 57), ("4.35%", 2000, 87), ("33.333333%", 3, 0)],  # exact: no floating-point shortfall
)
def test_tolerated_failures_are_a_count_or_a_percentage_rounded_down(tolerate: Any, items: int, tolerated: int) -> None:
    step = ForEachStep(id="f", for_each="docs", steps=[ActionStep(**STEP)], tolerate_failures=tolerate)
    assert step.tolerated(items) == tolerated


# ---- the model -----------------------------------------------------------------------------------


def test_error_into_without_on_failure_continue_is_refused() -> None:
    assert refusal(routine_with({**STEP, "id": "a", "error_into": "err"})) == (
        "r.yaml: steps[1]: error_into needs on_failure: continue"
    )
    parallel = {"id": "p", "parallel": [[{**STEP, "id": "a"}]], "on_failure": "fail", "error_into": "err"}
    assert "steps[1]: error_into needs on_failure: continue" in refusal(routine_with(parallel))
    loaded = parse_routine(routine_with({**STEP, "id": "a", "on_failure": "continue", "error_into": "err"}))
    assert loaded.steps[1].error_into == "err"


@pytest.mark.parametrize(
    "tolerate, problem",
    [(True, "a number of items (5) or a percentage"), (-1, "cannot be negative"), ("150%", "at most 100"),
     ("100.5%", "at most 100"), ("5", "a percentage"), ("x%", "a percentage"), (1.5, "a number of items"), (None, "a number")],
)
def test_tolerate_failures_that_is_no_count_or_percentage_is_refused(tolerate: Any, problem: str) -> None:
    fan_out = {"id": "f", "for_each": "docs", "steps": [{**STEP, "id": "a"}], "tolerate_failures": tolerate}
    message = refusal(routine_with(fan_out))
    assert message.startswith("r.yaml: steps[1].tolerate_failures: ") and problem in message, message


def test_as_and_from_are_the_names_written() -> None:
    fan_out = {
        "id": "f", "for_each": "docs", "as": "doc", "steps": [{**STEP, "id": "a"}],
        "collect": {"from": "kind", "into": "kinds"},
    }
    step = parse_routine(routine_with(fan_out)).steps[1]
    assert isinstance(step, ForEachStep)
    assert step.as_ == "doc" and step.collect == CollectSpec(**{"from": "kind", "into": "kinds"})
    assert step.collect.from_ == "kind" and step.max_concurrency == 10 and step.tolerate_failures == 0
    without_as = {key: value for key, value in fan_out.items() if key != "as"}
    assert parse_routine(routine_with(without_as)).steps[1].as_ == "item"
    assert "steps[1].as: String should match pattern" in refusal(routine_with({**fan_out, "as": "a b"}))
    assert "steps[1].collect.into: Field required" in refusal(routine_with({**fan_out, "collect": {"from": "kind"}}))


def test_yaml_on_under_retry_is_the_key_on(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare `on` as the boolean true; a routine file reads it as the string it is."""
    path = tmp_path / "retry.yaml"
    path.write_text(
        "name: retry\n"
        "steps:\n"
        "  - id: fetch\n"
        "    action: sleep\n"
        "    args: {seconds: 0}\n"
        "    timeout_s: 30\n"
        "    retry:\n"
        "      max_attempts: 3\n"
        "      on: [Timeout, ConnectionError]\n"
        "  - {id: flow, action: set, args: {name: v, value: off}, retry: {max_attempts: 2, on: [ValueError]}}\n"
    )
    data = read_routine_file(path)
    assert data["steps"][0]["retry"] == {"max_attempts": 3, "on": ["Timeout", "ConnectionError"]}
    assert data["steps"][1]["args"]["value"] == "off" and "on" in data["steps"][1]["retry"]
    routine = load_routine(path)
    assert routine.steps[0].retry == RetrySpec(max_attempts=3, on=["Timeout", "ConnectionError"])
    assert routine.steps[0].timeout_s == 30 and routine.steps[1].retry.on == ["ValueError"]


@pytest.mark.parametrize(
    "step, place",
    [
        ({**STEP, "id": "a", "retry": {"max_attempts": 0}}, "steps[1].retry.max_attempts"),
        ({**STEP, "id": "a", "retry": {"max_attempts": True}}, "steps[1].retry.max_attempts"),
        ({**STEP, "id": "a", "retry": {}}, "steps[1].retry.max_attempts"),
        ({**STEP, "id": "a", "retry": {"max_attempts": 2, "backoff_rate": 0.5}}, "steps[1].retry.backoff_rate"),
        ({**STEP, "id": "a", "retry": {"max_attempts": 2, "on": "ValueError"}}, "steps[1].retry.on"),
        ({**STEP, "id": "a", "retry": {"max_attempts": 2, "on": ["not a name"]}}, "steps[1].retry.on[0]"),
        ({**STEP, "id": "a", "retry": {"max_attempts": 2, "tries": 3}}, "steps[1].retry.tries"),
        ({**STEP, "id": "a", "timeout_s": 0}, "steps[1].timeout_s"),
        ({**STEP, "id": "a", "timeout_s": True}, "steps[1].timeout_s"),
        ({**STEP, "id": "a", "on_failure": "ignore"}, "steps[1].on_failure"),
        ({**STEP, "id": "a", "when": "x >"}, "steps[1].when"),
        ({"id": "p", "parallel": [[{**STEP, "id": "a", "when": "nosuch(x)"}]]}, "steps[1].parallel[0][0].when"),
        ({"id": "p", "parallel": [[{**STEP, "id": "a"}]], "retry": {"max_attempts": 2}}, "steps[1].retry"),
        ({"id": "c", "routine": {"name": "k", "steps": [STEP]}, "when": 42}, "steps[1].when"),
        ({"id": "f", "for_each": "docs", "steps": [{**STEP, "id": "a", "retry": {"max_attempts": 0}}]},
         "steps[1].steps[0].retry.max_attempts"),
        ({"id": "f", "for_each": "docs", "steps": [{**STEP, "id": "a"}], "max_concurrency": True}, "steps[1].max_concurrency"),
        ({"id": "f", "for_each": "docs", "steps": []}, "steps[1].steps"),
        ({"id": "f", "for_each": "docs", "steps": [{**STEP, "id": "a"}], "timeout_s": 5}, "steps[1].timeout_s"),
    ],
)
def test_a_refusal_names_the_file_and_the_place(step: dict[str, Any], place: str) -> None:
    assert refusal(routine_with(step)).startswith(f"r.yaml: {place}: ")


def test_a_refusal_in_a_file_names_the_file_and_the_place(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nsteps:\n  - {id: a, action: set, args: {name: v}, retry: {max_attempts: 0}}\n")
    with pytest.raises(InvalidRoutine) as caught:
        load_routine(path)
    assert str(caught.value).startswith(f"{path}: steps[0].retry.max_attempts: "), caught.value
    path.write_text("name: bad\ntimeout_s: -1\nsteps:\n  - {id: a, action: set, args: {name: v}, when: 'x > 1'}\n")
    with pytest.raises(InvalidRoutine, match=r"bad.yaml: timeout_s: Input should be greater than 0"):
        load_routine(path)


def test_a_when_is_allowed_on_every_kind_of_step() -> None:
    routine = parse_routine(
        {
            "name": "r",
            "variables": {"docs": [1], "go": True},
            "steps": [
                {**STEP, "when": "go"},
                {"id": "p", "parallel": [[{**STEP, "id": "a"}]], "when": "go"},
                {"id": "c", "routine": {"name": "k", "steps": [{**STEP, "id": "k1"}]}, "when": "go"},
                {"id": "f", "for_each": "docs", "steps": [{**STEP, "id": "b", "when": "item > 0"}], "when": "size(docs) > 0"},
            ],
        }
    )
    kinds = [type(step) for step in routine.steps]
    assert kinds == [ActionStep, ParallelStep, SubRoutineStep, ForEachStep]
    assert all(isinstance(step.when, Condition) for step in routine.steps)


def test_the_new_fields_come_back_the_same_from_the_stored_form() -> None:
    """What submit stores (the definition by alias, defaults left out) reads back as the same routine."""
    routine = parse_routine(
        {
            "name": "r",
            "timeout_s": 600,
            "variables": {"docs": [{"pages": 12}]},
            "steps": [
                {
                    "id": "each", "for_each": "docs", "as": "doc", "max_concurrency": 2, "inherit": ["docs"],
                    "collect": {"from": "kind", "into": "kinds"}, "merge": {"default": "PARENT_WINS"},
                    "tolerate_failures": "10%", "failures_into": "failed", "when": "size(docs) > 0",
                    "steps": [
                        {"id": "fetch", "action": "sleep", "args": {"seconds": 0}, "timeout_s": 30,
                         "retry": {"max_attempts": 3, "backoff_s": 0.5, "on": ["Timeout"]}},
                        {"id": "kind", "action": "set", "args": {"name": "kind", "value": "large"}, "when": "doc.pages > 10",
                         "on_failure": "continue", "error_into": "error"},
                    ],
                },
            ],
        }
    )
    stored = routine.model_dump(mode="json", exclude_defaults=True, by_alias=True)
    assert stored["steps"][0]["as"] == "doc" and stored["steps"][0]["collect"] == {"from": "kind", "into": "kinds"}
    assert stored["steps"][0]["when"] == "size(docs) > 0" and stored["steps"][0]["steps"][0]["retry"]["on"] == ["Timeout"]
    again = parse_routine(stored, stored=True)
    assert isinstance(again, Routine) and again == routine
