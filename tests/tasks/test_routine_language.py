"""The routine language in the engine (in-process): fan-outs, conditions, retries and failure
policies where they meet the rest of the engine (inline chains, secrets, sub-routines, status)."""

from __future__ import annotations

from typing import Any

import pytest

from runctx.testing import LocalEnvironment
from state.errors import InvalidValue
from state.sensitivity import DataSensitivity

FLAKY = "tests.support.language_actions:flaky"


@pytest.fixture
def env() -> LocalEnvironment:
    return LocalEnvironment()


def states(env: LocalEnvironment, run_id: str) -> dict[str, dict[str, Any]]:
    return {step["id"]: step for step in env.step_states(run_id)["steps"]}


def test_a_condition_inside_an_inline_chain_skips_and_runs_as_anywhere(env: LocalEnvironment) -> None:
    routine = {
        "name": "inline_when", "inline": True, "variables": {"x": 3},
        "steps": [
            {"id": "a", "action": "increment", "args": {"name": "x"}},
            {"id": "b", "when": "x > 10", "action": "set", "args": {"name": "big", "value": True}},
            {"id": "c", "when": "x == 4", "action": "set", "args": {"name": "four", "value": True}},
            {"id": "d", "action": "increment", "args": {"name": "x"}},
        ],
    }
    run_id, row = env.run(routine)
    assert row.status == "succeeded", row.error
    final = env.final(run_id).variables
    assert final["x"] == 5 and final["four"] is True and "big" not in final
    assert {sid: step["state"] for sid, step in states(env, run_id).items()} == {
        "a": "done", "b": "skipped", "c": "done", "d": "done"
    }


def test_a_retry_inside_an_inline_chain_runs_the_step_again_and_the_chain_goes_on(env: LocalEnvironment, tmp_path) -> None:
    counter = tmp_path / "calls"
    routine = {
        "name": "inline_retry", "inline": True,
        "steps": [
            {"id": "a", "action": "set", "args": {"name": "x", "value": 1}},
            {"id": "call", "action": FLAKY, "args": {"counter": str(counter), "succeed_on": 3},
             "retry": {"max_attempts": 4, "backoff_s": 0}},
            {"id": "b", "action": "increment", "args": {"name": "x"}},
        ],
    }
    run_id, row = env.run(routine)
    assert row.status == "succeeded", row.error
    assert env.final(run_id).variables == {"x": 2, "calls": 3}
    call = states(env, run_id)["call"]
    assert call["attempts"] == 3 and [r["attempt"] for r in call["retries"]] == [1, 2]


def test_a_retry_policy_that_does_not_name_the_error_fails_at_once(env: LocalEnvironment, tmp_path) -> None:
    counter = tmp_path / "calls"
    routine = {
        "name": "not_retried",
        "steps": [{"id": "call", "action": FLAKY, "args": {"counter": str(counter), "succeed_on": 3},
                   "retry": {"max_attempts": 4, "on": ["TimeoutError", "Timeout"]}}],
    }
    _, row = env.run(routine)
    assert row.status == "failed" and "ConnectionError" in (row.error or "") and counter.read_text() == "1"


def test_an_item_of_a_secret_list_is_secret_and_so_is_what_is_collected_from_it(env: LocalEnvironment) -> None:
    routine = {
        "name": "secret_items",
        "variables": {"tokens": {"sensitivity": "secret"}},
        "steps": [{
            "id": "each", "for_each": "tokens", "as": "token",
            "steps": [{"id": "copy", "action": "tests.support.actions:derive", "reads": ["token"]}],
            "collect": {"from": "derived", "into": "all_derived"},
        }],
    }
    run_id = env.submit(routine, {"tokens": ["alpha", "bravo"]})
    row = env.settle(run_id)
    assert row.status == "succeeded", row.error
    item = env.final(run_id, "each[1]")
    assert item.sensitivity_of("token") is DataSensitivity.SECRET
    root = env.final(run_id)
    assert root.variables["all_derived"] == ["ALPHA", "BRAVO"]
    assert root.sensitivity_of("all_derived") is DataSensitivity.SECRET


def test_a_condition_that_cannot_be_evaluated_fails_the_run_naming_its_step(env: LocalEnvironment) -> None:
    routine = {
        "name": "bad_when",
        "steps": [
            {"id": "e", "action": "set", "args": {"name": "x", "value": 1}},
            {"id": "h", "when": "missing > 1", "action": "set", "args": {"name": "y", "value": 1}},
        ],
    }
    _, row = env.run(routine)
    assert row.status == "failed" and row.error is not None
    assert row.error.startswith("step 'h': when 'missing > 1': no variable 'missing'"), row.error


def test_a_when_on_a_group_a_sub_routine_and_a_fan_out_skips_each_whole(env: LocalEnvironment) -> None:
    routine = {
        "name": "skipped_whole", "variables": {"go": False, "items": [1, 2]},
        "steps": [
            {"id": "group", "when": "go", "parallel": [[{"id": "p1", "action": "set", "args": {"name": "p1", "value": 1}}],
                                                       [{"id": "p2", "action": "set", "args": {"name": "p2", "value": 1}}]]},
            {"id": "sub", "when": "go", "routine": {"name": "child", "steps": [{"id": "c1", "action": "set", "args": {"name": "c", "value": 1}}]}},
            {"id": "each", "when": "go", "for_each": "items", "steps": [{"id": "w", "action": "set", "args": {"name": "w", "value": 1}}]},
            {"id": "last", "action": "set", "args": {"name": "last", "value": 1}},
        ],
    }
    run_id, row = env.run(routine)
    assert row.status == "succeeded", row.error
    assert set(env.final(run_id).variables) == {"go", "items", "last"}
    shown = {sid: step["state"] for sid, step in states(env, run_id).items()}
    assert shown == {"p1": "skipped", "p2": "skipped", "sub/c1": "skipped", "sub": "skipped", "each": "skipped", "last": "done"}


def test_too_many_items_fail_the_run_with_one_line(env: LocalEnvironment) -> None:
    env.engine.lifecycle.max_items = 5
    routine = {"name": "many",  # the list is made by a step: the run finds it too long when it gets there
               "steps": [{"id": "make", "action": "set", "args": {"name": "xs", "value": list(range(6))}},
                         {"id": "each", "for_each": "xs", "steps": [{"id": "w", "action": "set", "args": {"name": "w", "value": 1}}]}]}
    _, row = env.run(routine)
    assert row.status == "failed" and "max_items" in (row.error or "") and "6" in row.error and "\n" not in row.error


def test_a_for_each_over_a_value_that_is_not_a_list_fails_the_run_saying_so(env: LocalEnvironment) -> None:
    routine = {"name": "not_list", "variables": {"xs": "abc"},
               "steps": [{"id": "each", "for_each": "xs", "steps": [{"id": "w", "action": "set", "args": {"name": "w", "value": 1}}]}]}
    _, row = env.run(routine)
    assert row.status == "failed" and "'xs' holds a str, not a list" in (row.error or ""), row.error


def test_a_list_given_at_submit_with_too_many_items_is_refused_at_the_door_and_nothing_is_stored(env: LocalEnvironment) -> None:
    env.engine.lifecycle.max_items = 5
    routine = {"name": "door", "variables": {"xs": []},
               "steps": [{"id": "each", "for_each": "xs", "steps": [{"id": "w", "action": "set", "args": {"name": "w", "value": 1}}]}]}
    with pytest.raises(InvalidValue) as refused:
        env.submit(routine, {"xs": list(range(6))})
    assert str(refused.value) == (
        "routine 'door': variables.xs: 6 items for fan-out 'each', more than the 5 allowed (RUNCTX_MAX_ITEMS)"
    )
    assert env.store.ledger.list_runs() == []



def test_skipped_retried_and_timed_out_steps_are_counted_by_their_status(env: LocalEnvironment, tmp_path) -> None:
    from state.metrics import metrics

    def counted(status: str) -> float:
        return sum(
            sample.value for family in metrics().steps.collect() for sample in family.samples
            if sample.name.endswith("_total") and sample.labels == {"routine": "counted", "status": status}
        )

    before = {status: counted(status) for status in ("skipped", "retried", "succeeded")}
    counter = tmp_path / "calls"
    routine = {
        "name": "counted", "variables": {"go": False},
        "steps": [
            {"id": "maybe", "when": "go", "action": "set", "args": {"name": "x", "value": 1}},
            {"id": "call", "action": FLAKY, "args": {"counter": str(counter), "succeed_on": 3}, "retry": {"max_attempts": 3, "backoff_s": 0}},
        ],
    }
    _, row = env.run(routine)
    assert row.status == "succeeded", row.error
    assert counted("skipped") - before["skipped"] == 1
    assert counted("retried") - before["retried"] == 2
    assert counted("succeeded") - before["succeeded"] == 1
