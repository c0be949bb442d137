"""Inline routines (`inline: true`) driven by the in-process dispatcher, on the in-memory tiers.

A sequential successor in the same context runs in the task of its predecessor while that task is
within ``inline_budget_s``; every step still commits on its own, with its own record. A worker that
dies mid-chain has its message delivered again: the chain is walked from its first step, the
steps already applied are skipped (never run again), and only the step that was running runs again.
"""

from __future__ import annotations

from typing import Any

import pytest

from runctx.testing import LocalEnvironment
from state.errors import InvalidRoutine
from tasks.routine import parse_routine
from tests.support.engine import app, inc, steps_of
from tests.support.inline_actions import WorkerDied


@pytest.fixture
def h() -> LocalEnvironment:
    return LocalEnvironment()


def inline_sequence(n: int, **extra: Any) -> dict[str, Any]:
    return {"name": "inline-seq", "inline": True, "variables": {"counter": 0}, "steps": [inc(f"s{i}") for i in range(1, n + 1)], **extra}


def step_messages(h: LocalEnvironment) -> list[str]:
    return [d.message.step_id for d in h.dispatcher.sent if d.kind == "step"]


def test_an_inline_sequence_runs_in_one_task_and_records_every_step(h: LocalEnvironment) -> None:
    run_id, row = h.run(inline_sequence(20, inline_budget_s=60))

    assert row.status == "succeeded"
    assert h.final(run_id).variables["counter"] == 20
    assert h.final(run_id).applied_steps == [f"s{i}" for i in range(1, 21)]
    assert h.final(run_id).version == 21  # one commit per step
    assert step_messages(h) == ["s1"]  # the other 19 ran in s1's task
    steps = steps_of(row)
    assert sorted(steps) == sorted(f"s{i}" for i in range(1, 21))
    assert all(step["status"] == "succeeded" and step["worker"] and step["duration_s"] >= 0 for step in steps.values())


def test_a_routine_without_inline_sends_every_step_as_a_task(h: LocalEnvironment) -> None:
    routine = inline_sequence(5)
    routine["inline"] = False
    h.run(routine)
    assert step_messages(h) == ["s1", "s2", "s3", "s4", "s5"]


def test_the_budget_ends_a_chain_and_the_next_step_goes_out_as_a_task(h: LocalEnvironment) -> None:
    run_id, row = h.run(inline_sequence(5, inline_budget_s=1e-9))  # spent before any successor
    assert row.status == "succeeded" and h.final(run_id).variables["counter"] == 5
    assert step_messages(h) == ["s1", "s2", "s3", "s4", "s5"]


def test_a_step_with_inline_false_gets_a_task_of_its_own(h: LocalEnvironment) -> None:
    routine = inline_sequence(5, inline_budget_s=60)
    routine["steps"][2] = {**routine["steps"][2], "inline": False}
    run_id, row = h.run(routine)
    assert row.status == "succeeded" and h.final(run_id).variables["counter"] == 5
    assert step_messages(h) == ["s1", "s3"]  # s4 and s5 follow s3 in its task


def test_inline_never_crosses_into_a_branch_or_a_sub_routine(h: LocalEnvironment) -> None:
    routine = {
        "name": "inline-mixed",
        "inline": True,
        "inline_budget_s": 60,
        "variables": {"counter": 0},
        "steps": [
            inc("a1"),
            inc("a2"),
            {"id": "fan", "parallel": [[inc("b1"), inc("b2")], [inc("c1"), inc("c2")]]},
            inc("z1"),
            inc("z2"),
        ],
    }
    run_id, row = h.run(routine)
    assert row.status == "succeeded" and h.final(run_id).variables["counter"] == 8
    sent = step_messages(h)
    # a2 follows a1 inline; each branch starts as a task and goes on inline; after the join a task.
    assert sent[0] == "a1" and "a2" not in sent
    assert {"b1", "c1"} <= set(sent) and not {"b2", "c2"} & set(sent)
    assert "z1" in sent and "z2" not in sent


def test_a_worker_killed_mid_chain_reruns_only_the_step_that_was_running(h: LocalEnvironment) -> None:
    key = f"mid-chain-{id(h)}"
    routine = {
        "name": "inline-kill",
        "inline": True,
        "inline_budget_s": 60,
        "variables": {"log": []},
        "steps": [app("s1", 1), app("s2", 2), {"id": "s3", "action": "tests.support.inline_actions:die_once", "args": {"key": key, "value": 3}},
                  app("s4", 4), app("s5", 5)],
    }
    run_id = h.submit(routine)
    first = h.dispatcher.queue.popleft()
    with pytest.raises(WorkerDied):
        h.dispatcher.deliver(h.engine, first)
    records_before = {sid: dict(rec) for sid, rec in _records(h, run_id).items()}
    assert sorted(records_before) == ["s1", "s2"]  # committed before the death

    h.dispatcher.deliver(h.engine, first)  # the broker delivers the message again
    row = h.settle(run_id)

    assert row.status == "succeeded"
    assert h.final(run_id).variables["log"] == [1, 2, 3, 4, 5]  # each step applied exactly once
    assert h.final(run_id).applied_steps == ["s1", "s2", "s3", "s4", "s5"]
    steps = steps_of(row)
    for sid in ("s1", "s2"):  # not run again: their records are the first run's
        assert steps[sid]["finished_at"] == records_before[sid]["finished_at"]
    assert steps["s3"]["attempts"] == 2  # the one that was running ran again
    assert all(steps[sid]["attempts"] == 1 for sid in ("s1", "s2", "s4", "s5"))


def test_a_chain_step_whose_worker_keeps_dying_fails_the_run_naming_that_step() -> None:
    h = LocalEnvironment(max_attempts=3)
    routine = {
        "name": "inline-poison",
        "inline": True,
        "inline_budget_s": 60,
        "variables": {"counter": 0},
        "steps": [inc("s1"), {"id": "s2", "action": "tests.support.inline_actions:always_die"}, inc("s3")],
    }
    run_id = h.submit(routine)
    delivery = h.dispatcher.queue.popleft()
    for _ in range(3):
        with pytest.raises(WorkerDied):
            h.dispatcher.deliver(h.engine, delivery)
    h.dispatcher.deliver(h.engine, delivery)  # the fourth start of s2: over the cap
    row = h.settle(run_id)

    assert row.status == "failed"
    assert row.error == "step 's2' was started 3 times without finishing"
    assert h.final(run_id).variables["counter"] == 1 and h.final(run_id).applied_steps == ["s1"]


def _records(h: LocalEnvironment, run_id: str) -> dict[str, dict[str, Any]]:
    return {step["id"]: step for step in h.store.l2.run_summary(run_id)["steps"]}


def test_inline_fields_are_checked_like_any_other() -> None:
    with pytest.raises(InvalidRoutine, match="inline_budget_s: Input should be greater than 0"):
        parse_routine({"name": "x", "inline": True, "inline_budget_s": 0, "steps": [inc("s1")]})
    with pytest.raises(InvalidRoutine, match="inline"):
        parse_routine({"name": "x", "inline": "sometimes", "steps": [inc("s1")]})
    assert parse_routine({"name": "x", "inline": True, "steps": [inc("s1")]}).inline_budget_s == 0.05
