"""What `runctx status --json` and `runctx context --json` show of a run (runctx/read_models.py), on
runs driven step by step by `runctx.testing.LocalEnvironment`: each step's state and the totals,
a failed user action's traceback, and the tree of contexts with their versions in L2 and L3 and
sensitive values masked."""

from __future__ import annotations

from typing import Any

import pytest

from runctx.testing import LocalEnvironment
from state.errors import NotFound
from state.keys import context_id

ME = "tests.cli.test_read_models"
TOKEN = "tok-3b8e-read-model-secret"
EMAIL = "dave@example.com"


def explode(view: Any, args: dict[str, Any]) -> None:
    _inner()


def _inner() -> None:
    raise ValueError("kaboom")


def inc(step_id: str) -> dict[str, Any]:
    return {"id": step_id, "action": "increment", "args": {"name": "n"}}


SHAPED = {
    "name": "shaped",
    "variables": {"n": 0},
    "steps": [
        inc("a"),
        {"id": "p", "parallel": [[inc("x1"), inc("x2")], [inc("y1")]]},
        {"id": "sub", "routine": {"name": "kid", "steps": [inc("k1")]}, "inherit": ["n"]},
        inc("z"),
    ],
}
ORDER = ["a", "x1", "x2", "y1", "sub/k1", "sub", "z"]

SENSITIVE = {
    "name": "sensitive",
    "variables": {"n": 0, "user": "dave", "token": {"sensitivity": "secret"}, "email": {"sensitivity": "confidential"}},
    "steps": [inc("a"), inc("b"), {"id": "sub", "routine": {"name": "kid", "steps": [inc("k1")]}, "inherit": ["n", "token"]}],
}


@pytest.fixture
def env() -> LocalEnvironment:
    return LocalEnvironment()


def deliver(env: LocalEnvironment, count: int) -> None:
    """Run the next ``count`` queued messages, as workers would take them."""
    for _ in range(count):
        env.dispatcher.deliver(env.engine, env.dispatcher.queue.popleft())


def states(status: dict[str, Any]) -> list[tuple[str, str]]:
    return [(step["id"], step["state"]) for step in status["steps"]]


def totals(**counts: int) -> dict[str, int]:
    out = {"done": 0, "running": 0, "pending": 0, "failed": 0, "skipped": 0, "cancelled": 0, **counts}
    out["total"] = sum(out.values())
    return out


# ---- step_states --------------------------------------------------------------------------------


def test_a_run_just_submitted_has_its_first_step_running_and_the_rest_pending(env: LocalEnvironment) -> None:
    run_id = env.submit(SHAPED)
    status = env.step_states(run_id)
    assert status["run_id"] == run_id and status["routine"] == "shaped" and status["version"] == 1
    assert status["status"] == "running" and status["error"] is None
    assert states(status) == [("a", "running")] + [(step, "pending") for step in ORDER[1:]]
    assert status["totals"] == totals(running=1, pending=6)


def test_steps_are_listed_in_reading_order_each_branch_whole_and_a_sub_routine_before_its_merge(env: LocalEnvironment) -> None:
    run_id, row = env.run(SHAPED)
    assert row.status == "succeeded"
    status = env.step_states(run_id)
    assert states(status) == [(step, "done") for step in ORDER]
    assert status["totals"] == totals(done=7)


def test_every_branch_a_fork_started_is_running(env: LocalEnvironment) -> None:
    run_id = env.submit(SHAPED)
    deliver(env, 1)  # a
    assert states(env.step_states(run_id)) == [
        ("a", "done"), ("x1", "running"), ("x2", "pending"), ("y1", "running"), ("sub/k1", "pending"), ("sub", "pending"), ("z", "pending"),
    ]


def test_a_step_of_a_sub_routine_runs_in_its_child_context_once_the_group_before_it_joined(env: LocalEnvironment) -> None:
    run_id = env.submit(SHAPED)
    deliver(env, 4)  # a, x1, y1, x2: the group joins and the child is created
    status = env.step_states(run_id)
    assert states(status) == [(step, "done") for step in ORDER[:4]] + [("sub/k1", "running"), ("sub", "pending"), ("z", "pending")]
    assert status["totals"] == totals(done=4, running=1, pending=2)


def test_a_done_step_says_where_and_how_it_ran_and_a_pending_one_nothing(env: LocalEnvironment) -> None:
    run_id = env.submit(SHAPED)
    deliver(env, 1)
    first, second = env.step_states(run_id)["steps"][:2]
    assert first["worker"] == "in-process" and first["attempts"] == 1 and first["duration_s"] >= 0
    assert second == {"id": "x1", "state": "running", "worker": None, "attempts": 0, "duration_s": None}
    assert "traceback" not in first


def test_a_failed_user_action_shows_its_traceback_and_the_steps_it_left_are_cancelled(env: LocalEnvironment) -> None:
    routine = {"name": "buggy", "steps": [inc("a"), {"id": "bug", "action": f"{ME}:explode"}, inc("b"), inc("c")]}
    run_id, row = env.run(routine)
    status = env.step_states(run_id)
    assert status["status"] == "failed" and "raised ValueError: kaboom" in status["error"]
    assert states(status) == [("a", "done"), ("bug", "failed"), ("b", "cancelled"), ("c", "cancelled")]
    assert status["totals"] == totals(done=1, failed=1, cancelled=2)
    trace = status["steps"][1]["traceback"]
    assert trace.startswith("Traceback (most recent call last):") and "in explode" in trace and "in _inner" in trace
    assert trace.rstrip().endswith("ValueError: kaboom")


def test_a_built_in_failure_has_no_traceback(env: LocalEnvironment) -> None:
    run_id, row = env.run({"name": "stop", "steps": [{"id": "halt", "action": "fail", "args": {"message": "enough"}}]})
    [step] = env.step_states(run_id)["steps"]
    assert step["state"] == "failed" and "traceback" not in step
    assert "enough" in env.step_states(run_id)["error"]


def test_the_steps_a_cancelled_run_never_finished_are_cancelled(env: LocalEnvironment) -> None:
    run_id = env.submit(SHAPED)
    deliver(env, 1)
    assert env.engine.cancel(run_id)
    env.settle(run_id)
    status = env.step_states(run_id)
    assert status["status"] == "cancelled"
    assert states(status) == [("a", "done")] + [(step, "cancelled") for step in ORDER[1:]]
    assert status["totals"] == totals(done=1, cancelled=6)


def test_an_unknown_run_is_not_found(env: LocalEnvironment) -> None:
    with pytest.raises(NotFound, match="run 'no-such-run' does not exist"):
        env.step_states("no-such-run")
    with pytest.raises(NotFound, match="run 'no-such-run' does not exist"):
        env.context_tree("no-such-run")


# ---- context_tree -------------------------------------------------------------------------------


def test_a_running_run_shows_its_root_ahead_in_l2_and_no_child_it_has_not_reached(env: LocalEnvironment) -> None:
    run_id = env.submit(SENSITIVE, {"token": TOKEN, "email": EMAIL})
    deliver(env, 1)  # a: committed to L2, its L3 write still to come
    tree = env.context_tree(run_id)
    assert tree["run_id"] == run_id and tree["status"] == "running"
    [root] = tree["contexts"]
    assert root["id"] == run_id and root["path"] == "" and root["parent"] is None and root["routine"] == "sensitive"
    assert (root["version_l2"], root["version_l3"], root["pending_write"]) == (2, 1, True)
    assert root["variables"]["n"] == 1


def test_a_finished_run_shows_root_then_child_each_written_to_l3(env: LocalEnvironment) -> None:
    run_id, row = env.run(SENSITIVE, {"token": TOKEN, "email": EMAIL})
    assert row.status == "succeeded"
    root, child = env.context_tree(run_id)["contexts"]
    assert [root["path"], child["path"]] == ["", "sub"]
    assert child["id"] == context_id(run_id, "sub") and child["parent"] == run_id and child["routine"] == "kid"
    for ctx in (root, child):
        assert ctx["version_l3"] is not None and ctx["pending_write"] is False
        assert ctx["version_l2"] in (None, ctx["version_l3"])
    assert root["variables"]["n"] == 3 and child["variables"]["n"] == 3


def test_confidential_and_secret_values_are_masked_and_their_sensitivity_shown(env: LocalEnvironment) -> None:
    run_id, _ = env.run(SENSITIVE, {"token": TOKEN, "email": EMAIL})
    tree = env.context_tree(run_id)
    root, child = tree["contexts"]
    assert root["variables"] == {"n": 3, "user": "dave", "token": "***", "email": "***"}
    assert root["sensitivity"] == {"token": "secret", "email": "confidential"}
    assert child["variables"]["token"] == "***" and child["sensitivity"] == {"token": "secret"}
    assert TOKEN not in repr(tree) and EMAIL not in repr(tree)


def test_a_context_l2_no_longer_holds_is_shown_from_l3(env: LocalEnvironment) -> None:
    run_id, _ = env.run(SENSITIVE, {"token": TOKEN, "email": EMAIL})
    env.store.l2.evict_context(run_id)
    [root] = [ctx for ctx in env.context_tree(run_id)["contexts"] if ctx["path"] == ""]
    assert root["version_l2"] is None and root["version_l3"] == env.final(run_id).version
    assert root["pending_write"] is False and root["variables"]["n"] == 3
