"""Resuming a failed or cancelled run (`RunLifecycle.resume`), in memory: every applied step stays
applied, the failed step runs again with the corrected variable, the history keeps both."""

from __future__ import annotations

import pytest

from runctx.testing import LocalEnvironment
from state.errors import InvalidValue, NotFound
from tests.support.actions import ME
from tests.support.engine import inc

ROUTINE = {
    "name": "resumable",
    "variables": {"counter": 0, "total": 12, "divisor": 0},
    "steps": [inc("a"), inc("b"), {"id": "div", "action": f"{ME}:divide"}, inc("c")],
}


def test_resume_with_a_corrected_variable_runs_the_failed_step_and_keeps_the_applied_ones() -> None:
    env = LocalEnvironment()
    run_id = env.submit(ROUTINE)
    failed = env.settle(run_id)
    assert failed.status == "failed" and "divisor is 0" in failed.error
    assert env.store.get_context(run_id).get("counter") == 2

    assert env.engine.resume(run_id, {"divisor": 4}) is True
    row = env.settle(run_id)
    assert row.status == "succeeded", row.error
    ctx = env.store.get_context(run_id)
    assert (ctx.get("counter"), ctx.get("quotient"), ctx.get("divisor")) == (3, 3.0, 4)  # a and b once, c once
    assert row.epoch > failed.epoch and row.error is None
    statuses = [(e.step_id, e.status) for e in env.store.history.of_run(run_id, context_ids=[run_id]) if e.kind == "event"]
    assert ("", "failed") in statuses and ("", "resumed") in statuses and statuses[-1] == ("", "succeeded")
    edits = [e for e in env.store.history.of_run(run_id, context_ids=[run_id]) if e.kind == "edit"]
    assert [(c.name, c.value) for e in edits for c in e.changes] == [("divisor", 4)]


def test_resume_of_a_cancelled_run_goes_on() -> None:
    env = LocalEnvironment()
    run_id = env.submit({**ROUTINE, "variables": {**ROUTINE["variables"], "divisor": 2}})
    env.engine.cancel(run_id)
    assert env.settle(run_id).status == "cancelled"
    assert env.engine.resume(run_id) is True
    assert env.settle(run_id).status == "succeeded"
    assert env.store.get_context(run_id).get("counter") == 3


def test_a_run_that_succeeded_or_runs_or_does_not_exist_is_not_resumed() -> None:
    env = LocalEnvironment()
    run_id = env.submit({**ROUTINE, "variables": {**ROUTINE["variables"], "divisor": 3}})
    assert env.engine.resume(run_id) is False  # running: nothing to do
    assert env.settle(run_id).status == "succeeded"
    with pytest.raises(InvalidValue, match="succeeded: only a failed or cancelled run can be resumed"):
        env.engine.resume(run_id, {"divisor": 1})
    assert env.store.get_context(run_id).get("divisor") == 3  # nothing changed
    with pytest.raises(NotFound):
        env.engine.resume("no-such-run")


# ---- fork ------------------------------------------------------------------------------------------------

COUNTER = {"name": "ten", "variables": {"counter": 0, "step": 1}, "steps": [inc(f"s{i}") for i in range(1, 11)]}


def test_fork_from_step_6_starts_from_the_counter_before_it_and_runs_the_steps_from_6_on() -> None:
    env = LocalEnvironment()
    origin = env.submit(COUNTER)
    assert env.settle(origin).status == "succeeded"
    forked = env.engine.fork(origin, "s6", {"bonus": True})
    row = env.settle(forked)
    assert row.status == "succeeded" and row.meta.get("forked_from") == origin
    ctx = env.store.get_context(forked)
    assert ctx.get("counter") == 5 + 5 and ctx.get("bonus") is True  # 5 before s6, then s6..s10
    entries = env.store.history.of_run(forked, context_ids=[forked])
    assert sorted(e.step_id for e in entries if e.kind == "step") == [f"s{i}" for i in (10, 6, 7, 8, 9)]
    assert env.store.get_context(origin).get("counter") == 10  # the origin is left as it is


def test_fork_from_a_step_that_never_applied_or_of_an_unknown_run_is_refused() -> None:
    env = LocalEnvironment()
    origin = env.submit(COUNTER)
    env.settle(origin)
    with pytest.raises(InvalidValue, match="'s99': no commit of that step"):
        env.engine.fork(origin, "s99")
    with pytest.raises(NotFound):
        env.engine.fork("no-such-run", "s1")
    assert [row.run_id for row in env.store.ledger.list_runs(limit=10)] == [origin]
