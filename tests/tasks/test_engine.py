"""The run state machine (`tasks.engine.RunEngine`) driven by the in-process dispatcher.

Every test runs whole routines with `runctx.testing.LocalEnvironment`: the in-memory twins of L2
and L3 and the in-process dispatcher, so no Redis, PostgreSQL, broker or worker is needed and a
run takes milliseconds. Broker behaviours (a message delivered twice, a task redelivered with
the same id, infrastructure errors retried) are reproduced by editing the dispatcher's queue or
monkeypatching one tier operation.

Covered: sequences, fork/join (nested too), sub-routines merged back under each strategy,
at-most-once application of duplicated and redelivered steps, the attempts cap, finalize
idempotence, failures (step errors, redacted user-action errors, routine and limit errors,
infrastructure errors after retries), refused commits re-applied, the write-behind, exports and
submit-time limits.

User actions used by the routines are in tests/support/actions.py, referenced as
``tests.support.actions:<name>``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from runctx.testing import Delivery, LocalEnvironment
from state.errors import CommunicationFailure, LimitExceeded
from state.models import ResourceLimits, RunContext
from state.store import TieredStore
from state.tiers.data import CommitRequest, RunRow
from state.tiers.local import LocalCache
from state.tiers.memory import MemoryL2
from tasks.steps import StepExecutor
from tests.support.actions import ME
from tests.support.engine import another_process, app, inc, log_step, sequence, steps_of
from tests.support.merge_cases import (
    CASES,
    CHILD_FINAL,
    COMMON,
    NEW_FROM_CHILD,
    PARENT_UNMERGED,
    merge_routine,
)

SECRET = "s3cr3t-token-value"


@pytest.fixture(params=["sent", "outbox"])
def h(request: pytest.FixtureRequest) -> LocalEnvironment:
    """Every engine test twice: successors sent after the commit, and carried by it (the outbox)."""
    return LocalEnvironment(outbox=request.param == "outbox")


def intrude_before_next_commit(monkeypatch, store: TieredStore, change: Callable[[RunContext], None]) -> None:
    """Make another process commit ``change`` to the same context just before the next step commit lands.

    The other process is a second TieredStore (own L1) on the same L2/L3; its commit goes in
    first, so the step's compare-and-set is refused and must be re-applied on the newer version.
    """
    other = TieredStore(LocalCache(store.config), store.l2, store.l3, config=store.config)
    original = store.l2.commit
    done = []

    def commit(request: CommitRequest, **kwargs: Any) -> Any:
        ctx = request.context
        if not done:
            done.append(ctx.context_id)
            StepExecutor(other)._commit(ctx.context_id, other.get_context(ctx.context_id), "intruder", change, None, None)
        return original(request, **kwargs)

    monkeypatch.setattr(store.l2, "commit", commit)


def l2_conflicts() -> float:
    """Compare-and-set commits refused so far, in this process (`runctx_l2_conflicts_total`)."""
    return REGISTRY.get_sample_value("runctx_l2_conflicts_total") or 0.0


# ---- sequences --------------------------------------------------------------------------------------


def test_a_sequence_succeeds_with_exact_counter_ordered_log_and_finalize_meta(h: LocalEnvironment) -> None:
    routine = {
        "name": "seq",
        "variables": {"counter": 0},
        "steps": [inc("i1"), app("a1", "x"), inc("i2", by=2), app("a2", "y"), app("a3", "z")],
    }
    run_id, row = h.run(routine)

    assert row.status == "succeeded" and row.error is None and row.finished_at is not None
    final = h.final(run_id)
    assert final.variables == {"counter": 3, "log": ["x", "y", "z"]}
    assert final.applied_steps == ["i1", "a1", "i2", "a2", "a3"]
    assert final.version == 6  # created at 1, one version per step
    assert [s["id"] for s in row.meta["steps"]] == ["i1", "a1", "i2", "a2", "a3"]
    assert all(s["status"] == "succeeded" and s["attempts"] == 1 for s in row.meta["steps"])
    assert len(h.finalizes(run_id)) == 1


def test_each_step_sees_what_the_one_before_committed_and_mapping_results_are_sets(h: LocalEnvironment) -> None:
    routine = {
        "name": "seq-view",
        "variables": {"counter": 0},
        "steps": [inc("i1", by=5), {"id": "m", "action": f"{ME}:as_mapping"}, {"id": "c", "action": "copy", "args": {"from": "doubled", "to": "copy"}}],
    }
    run_id, row = h.run(routine)
    assert row.status == "succeeded"
    assert h.final(run_id).variables == {"counter": 5, "doubled": 10, "seen": True, "copy": 10}


def test_submit_variables_override_declared_ones_and_undeclared_ones_are_stored(h: LocalEnvironment) -> None:
    run_id, row = h.run(sequence(2), variables={"counter": 10, "extra": {"k": 1}})
    assert row.status == "succeeded"
    assert h.final(run_id).variables == {"counter": 12, "extra": {"k": 1}}


# ---- fork and join ------------------------------------------------------------------------------


def test_fork_join_runs_the_step_after_the_group_once_after_every_branch(h: LocalEnvironment) -> None:
    branches = [[inc(f"{b}{i}") for i in range(1, 4)] for b in "abcd"]
    routine = {"name": "fan", "variables": {"counter": 0}, "steps": [{"id": "fan", "parallel": branches}, log_step("after")]}
    run_id, row = h.run(routine)

    assert row.status == "succeeded"
    final = h.final(run_id)
    assert final.variables == {"counter": 12, "log": [12]}  # "after" ran once, with every branch counted
    assert final.applied_steps[-1] == "after" and len(final.applied_steps) == 13
    assert sorted(steps_of(row)) == sorted([s["id"] for b in branches for s in b] + ["after"])
    assert sum(1 for d in h.dispatcher.sent if d.kind == "step" and d.message.step_id == "after") == 1


def test_nested_parallel_groups_join_before_the_outer_join_goes_on(h: LocalEnvironment) -> None:
    inner = {"id": "inner", "parallel": [[inc("b1")], [inc("c1"), inc("c2")], [inc("d1"), inc("d2"), inc("d3")]]}
    routine = {
        "name": "nested",
        "variables": {"counter": 0},
        "steps": [
            {"id": "outer", "parallel": [[inc("a1"), inner, log_step("a-after-inner")], [inc("e1")]]},
            log_step("after"),
        ],
    }
    run_id, row = h.run(routine)

    assert row.status == "succeeded"
    final = h.final(run_id)
    assert final.variables["counter"] == 8
    # a-after-inner ran once, after a1 and all six inner steps (e1 may or may not have run yet).
    assert final.variables["log"][0] in (7, 8) and final.variables["log"][1:] == [8]
    assert final.applied_steps[-1] == "after"
    assert final.applied_steps.index("a-after-inner") > max(final.applied_steps.index(s) for s in ("b1", "c2", "d3", "a1"))


# ---- sub-routines ---------------------------------------------------------------------------------

# The scenario of tests/e2e/test_subroutine.py (tests/support/merge_cases.py), ordered by the FIFO
# queue instead of sleeps.
MERGE_CASES = CASES  # the same cases as tests/e2e/test_subroutine.py


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_subroutine_merges_back_under_each_strategy(h: LocalEnvironment, case: str) -> None:
    merge, merged = MERGE_CASES[case]
    run_id, row = h.run(merge_routine(merge))

    assert row.status == "succeeded", row.error
    assert h.final(run_id).variables == {**COMMON, **NEW_FROM_CHILD, **merged}
    assert h.final(run_id, "sub").variables == CHILD_FINAL  # the child's own context is kept in L3
    assert {"sub/bump", "sub/reprofile", "sub", "parent-count", "after"} <= set(steps_of(row))


def test_subroutine_merge_under_fail_fails_the_run_naming_only_the_conflicting_variables(h: LocalEnvironment) -> None:
    run_id, row = h.run(merge_routine({"default": "FAIL"}))

    assert row.status == "failed"
    assert "count" in row.error and "profile" in row.error, row.error
    assert not any(name in row.error for name in ("untouched", "note", "extra", "language")), row.error
    steps = steps_of(row)
    assert steps["sub"]["status"] == "failed" and "after" not in steps
    assert h.final(run_id).variables == PARENT_UNMERGED
    assert len(h.finalizes(run_id)) == 1


def test_a_child_inherits_only_the_named_variables_and_its_context_is_in_l3(h: LocalEnvironment) -> None:
    child = {
        "name": "kid",
        "variables": {"own": 1},
        "steps": [{"id": "peek", "action": "copy", "args": {"from": "a", "to": "a_copy"}}],
    }
    routine = {"name": "parent", "variables": {"a": "A", "b": "B"}, "steps": [{"id": "sub", "routine": child, "inherit": ["a"]}]}
    run_id, row = h.run(routine)

    assert row.status == "succeeded"
    kid = h.final(run_id, "sub")
    assert kid.variables == {"a": "A", "own": 1, "a_copy": "A"}  # no "b"
    assert kid.parent_id == run_id and kid.depth == 1 and kid.applied_steps == ["sub/peek"]
    assert h.final(run_id).variables == {"a": "A", "b": "B", "own": 1, "a_copy": "A"}


def test_a_child_that_reads_a_variable_it_did_not_inherit_fails_the_run(h: LocalEnvironment) -> None:
    child = {"name": "kid", "steps": [{"id": "peek", "action": "copy", "args": {"from": "b", "to": "b_copy"}}]}
    routine = {"name": "parent", "variables": {"a": 1, "b": 2}, "steps": [{"id": "sub", "routine": child, "inherit": ["a"]}]}
    run_id, row = h.run(routine)
    assert row.status == "failed" and "'b' does not exist" in row.error


def test_nested_subroutines_each_get_their_context_and_merge_back_in_turn(h: LocalEnvironment) -> None:
    grandchild = {"name": "gc", "steps": [inc("g1", by=100)]}
    child = {"name": "c", "steps": [inc("c1", by=10), {"id": "deeper", "routine": grandchild, "inherit": ["counter"]}, inc("c2", by=10)]}
    routine = {"name": "p", "variables": {"counter": 1}, "steps": [{"id": "sub", "routine": child, "inherit": ["counter"]}, log_step("after")]}
    run_id, row = h.run(routine)

    assert row.status == "succeeded", row.error
    assert h.final(run_id, "sub/deeper").variables == {"counter": 111}
    assert h.final(run_id, "sub/deeper").depth == 2
    assert h.final(run_id, "sub").variables == {"counter": 121}
    assert h.final(run_id).variables == {"counter": 121, "log": [121]}
    assert {"sub/deeper/g1", "sub/deeper", "sub/c2", "sub"} <= set(steps_of(row))


def test_a_failing_step_inside_a_subroutine_fails_the_run_and_keeps_the_child_context(h: LocalEnvironment) -> None:
    child = {"name": "kid", "steps": [inc("k1", by=5), {"id": "k2", "action": "fail", "args": {"message": "child broke"}}, inc("k3")]}
    routine = {"name": "parent", "variables": {"counter": 1}, "steps": [{"id": "sub", "routine": child, "inherit": ["counter"]}, inc("after")]}
    run_id, row = h.run(routine)

    assert row.status == "failed" and "'sub/k2'" in row.error and "child broke" in row.error
    assert h.final(run_id, "sub").variables == {"counter": 6} and h.final(run_id, "sub").applied_steps == ["sub/k1"]
    assert h.final(run_id).variables == {"counter": 1}  # never merged back
    assert set(steps_of(row)) == {"sub/k1", "sub/k2"}


def test_a_redelivery_before_a_subroutine_reuses_the_child_context_it_already_created(h: LocalEnvironment) -> None:
    child = {"name": "kid", "steps": [inc("k1", by=10)]}
    routine = {"name": "parent", "variables": {"counter": 0}, "steps": [inc("s1"), {"id": "sub", "routine": child, "inherit": ["counter"]}, inc("after")]}
    run_id = h.submit(routine)
    delivery = h.dispatcher.queue.popleft()
    h.dispatcher.deliver(h.engine, delivery)  # s1 applied, child context created, sub/k1 queued
    h.dispatcher.queue.append(delivery)  # s1 redelivered: creates the child again -> finds the existing one
    row = h.settle(run_id)

    assert row.status == "succeeded", row.error
    assert h.final(run_id, "sub").variables == {"counter": 11}
    assert h.final(run_id).variables == {"counter": 12}
    assert sum(1 for d in h.dispatcher.sent if d.kind == "step" and d.message.step_id == "sub/k1") == 2


def test_exports_declared_by_a_subroutine_are_exported_when_the_run_finishes(h: LocalEnvironment) -> None:
    child = {
        "name": "kid",
        "steps": [{"id": "note", "action": "set", "args": {"name": "note", "value": "hi"}}],
        "exports": [{"variable": "note", "destination": "persistent"}],
    }
    run_id, row = h.run({"name": "parent", "steps": [{"id": "sub", "routine": child}]})
    assert row.status == "succeeded"
    assert (run_id, "note", "default") in h.store.l3.exports


# ---- duplicate and redelivered messages ------------------------------------------------------------


def test_a_step_message_delivered_twice_applies_once(h: LocalEnvironment) -> None:
    run_id = h.submit(sequence(3))
    first = h.dispatcher.queue[0]
    h.dispatcher.queue.append(Delivery(first.kind, first.message))  # same message, another task id
    row = h.settle(run_id)

    assert row.status == "succeeded"
    assert h.final(run_id).variables["counter"] == 3
    assert h.final(run_id).applied_steps == ["s1", "s2", "s3"]
    # The duplicate, a first delivery of its own message, found the step applied and changed nothing.
    assert steps_of(row)["s1"]["attempts"] == 1
    assert sum(1 for d in h.dispatcher.sent if d.kind == "step" and d.message.step_id == "s2") == 1
    assert len(h.finalizes(run_id)) == 1


def test_a_duplicated_branch_step_does_not_double_count_or_rerun_the_join(h: LocalEnvironment) -> None:
    routine = {"name": "fan", "variables": {"counter": 0}, "steps": [{"id": "fan", "parallel": [[inc("a1")], [inc("b1")]]}, log_step("after")]}
    run_id = h.submit(routine)
    h.dispatcher.queue.extend([Delivery("step", d.message) for d in list(h.dispatcher.queue)])
    row = h.settle(run_id)

    assert row.status == "succeeded"
    assert h.final(run_id).variables == {"counter": 2, "log": [2]}


def test_a_redelivered_task_that_had_finished_applies_nothing_and_the_run_completes(h: LocalEnvironment) -> None:
    run_id = h.submit(sequence(3))
    delivery = h.dispatcher.queue.popleft()
    h.dispatcher.deliver(h.engine, delivery)
    h.dispatcher.queue.append(delivery)  # the same task_id again, as after a lost worker
    row = h.settle(run_id)

    assert row.status == "succeeded"
    assert h.final(run_id).variables["counter"] == 3
    assert steps_of(row)["s1"]["attempts"] == 1  # the redelivery found it applied: not started again
    # The redelivery re-dispatched s2 (in case the first run died before that); the copy is a no-op.
    assert sum(1 for d in h.dispatcher.sent if d.kind == "step" and d.message.step_id == "s2") == 2
    assert len(h.finalizes(run_id)) == 1


def test_a_redelivery_recovers_a_step_whose_first_run_died_before_dispatching_its_successors(h: LocalEnvironment, monkeypatch) -> None:
    run_id = h.submit(sequence(3))
    delivery = h.dispatcher.queue.popleft()
    with monkeypatch.context() as m:
        m.setattr(h.dispatcher, "step", lambda message: None)  # committed, then the worker died
        m.setattr(h.dispatcher, "successor", lambda message, context: None)  # (a successor no commit carries)
        h.dispatcher.deliver(h.engine, delivery)
    assert not h.dispatcher.queue and h.store.ledger.get_run(run_id).status == "running"

    h.dispatcher.queue.append(delivery)  # the broker redelivers the unacknowledged task
    row = h.settle(run_id)
    assert row.status == "succeeded"
    assert h.final(run_id).variables["counter"] == 3


def test_with_the_outbox_a_step_that_committed_has_sent_its_successor_whatever_happens_after() -> None:
    h = LocalEnvironment(outbox=True)
    run_id = h.submit(sequence(3))
    delivery = h.dispatcher.queue.popleft()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(h.dispatcher, "step", lambda message: pytest.fail("sent apart from the commit"))
        h.dispatcher.deliver(h.engine, delivery)  # the commit carried s2: nothing is left to send
    assert [d.message.step_id for d in h.dispatcher.queue] == ["s2"]
    assert h.dispatcher.queue[0].message.versions == {"": 2}  # the version s1 committed

    h.dispatcher.queue.append(delivery)  # delivered again anyway: applies nothing, sends s2 again
    row = h.settle(run_id)
    assert row.status == "succeeded" and h.final(run_id).variables["counter"] == 3
    assert sum(1 for d in h.dispatcher.sent if d.kind == "step" and d.message.step_id == "s2") == 2


class Processes:
    """Worker processes on one L2 and L3, each with its own L1 and engine; a commit's outbox carries
    its successor, and deliveries go round the processes in turn, as worker nodes of one process
    each take turns on a sequence."""

    def __init__(self, count: int = 2) -> None:
        first = LocalEnvironment(outbox=True)
        assert isinstance(first.store.l2, MemoryL2)
        self.first = first
        self.processes = [first] + [another_process(first) for _ in range(count - 1)]
        self.stores = [process.store for process in self.processes]
        self.dispatcher = first.dispatcher
        self.engines = [process.engine for process in self.processes]
        self.l2_reads: list[str] = []
        original = first.store.l2.get_context

        def get_context(context_id: str):
            self.l2_reads.append(context_id)
            return original(context_id)

        first.store.l2.get_context = get_context  # type: ignore[method-assign]

    def run(self, routine: dict[str, Any], variables: dict[str, Any] | None = None) -> RunRow:
        run_id = self.first.submit(routine, variables)
        turn = 0
        while self.dispatcher.queue:
            self.dispatcher.deliver(self.engines[turn % len(self.engines)], self.dispatcher.queue.popleft())
            turn += 1
        self.step_reads = self.l2_reads.count(run_id)  # the run's steps and finalize; not the write-behind
        self.dispatcher.settle(self.engines[0])
        row = self.stores[0].ledger.get_run(run_id)
        assert row is not None
        return row


@pytest.mark.parametrize("processes", [2, 3, 5])
def test_the_next_step_finds_the_state_its_predecessor_committed_elsewhere_in_its_own_l1(processes: int) -> None:
    many = Processes(processes)
    row = many.run(sequence(30))
    assert row.status == "succeeded"
    assert many.stores[0].l3.get_context(row.run_id).variables["counter"] == 30
    pushed = [d for d in many.dispatcher.sent if d.pushed]
    assert len(pushed) == 29 and all(d.carried is not None for d in pushed)
    assert [d.carried.version for d in pushed] == [d.message.versions[""] for d in pushed]
    # Each process but the submitter's reads the context once, at its first step; after that each
    # state it is carried names the steps since the version it holds, and it follows to it. One
    # read more: the finalize's (no message carries a state to it, and no broadcast runs here).
    assert many.step_reads == processes, many.l2_reads


def test_no_message_carries_the_state_of_a_context_holding_sensitive_values() -> None:
    two = Processes()
    routine = {**sequence(6), "variables": {"counter": 0, "token": {"sensitivity": "secret"}}}
    row = two.run(routine, {"token": SECRET})
    assert row.status == "succeeded"
    pushed = [d for d in two.dispatcher.sent if d.pushed]
    assert len(pushed) == 5 and all(d.carried is None for d in pushed)
    assert not any(SECRET in raw for raw in map(repr, two.dispatcher.sent))
    assert two.step_reads >= 4  # each step reads what the other process committed


def test_a_carried_state_that_fails_its_checksum_is_not_used() -> None:
    two = Processes()
    original = two.dispatcher._send

    forged: list[Delivery] = []

    def tamper(delivery: Delivery) -> None:
        if delivery.carried is not None:  # another counter value under the old checksum
            payload = delivery.carried.payload.replace(b'"counter":', b'"counter":9', 1)
            assert payload != delivery.carried.payload
            delivery.carried = dataclasses.replace(delivery.carried, payload=payload)
            forged.append(delivery)
        original(delivery)

    two.dispatcher._send = tamper  # type: ignore[method-assign]
    row = two.run(sequence(8))
    assert row.status == "succeeded"
    assert len(forged) == 7
    assert two.stores[0].l3.get_context(row.run_id).variables["counter"] == 8  # no forged value counted
    assert two.step_reads >= 6  # each forged state was dropped: the step read L2


def test_the_outbox_carries_only_a_single_real_successor() -> None:
    h = LocalEnvironment(outbox=True)
    routine = {
        "name": "shapes", "variables": {"counter": 0},
        "steps": [
            inc("a"),
            {"id": "fan", "parallel": [[inc("b1")], [inc("b2")]]},
            inc("c"),
        ],
    }
    run_id, row = h.run(routine)
    assert row.status == "succeeded" and h.final(run_id).variables["counter"] == 4
    # a is followed by a fork (two steps), b1 and b2 by a join (c goes only once both are in), c by
    # the finalize: each sent after its commit, none pushed by it.
    assert [d.message.step_id for d in h.dispatcher.sent if d.kind == "step"] == ["a", "b1", "b2", "c"]
    assert not any(d.pushed for d in h.dispatcher.sent)

    run_id, row = h.run(sequence(4))
    assert row.status == "succeeded"
    steps = [d for d in h.dispatcher.sent if d.kind == "step" and d.message.run_id == run_id]
    assert [(d.message.step_id, d.pushed) for d in steps] == [("s1", False), ("s2", True), ("s3", True), ("s4", True)]


def test_a_redelivered_last_step_sends_a_second_finalize_that_changes_nothing(h: LocalEnvironment) -> None:
    run_id, row = h.run(sequence(2))
    h.dispatcher.queue.append(h.first_step("s2"))
    again = h.settle(run_id)

    assert len(h.finalizes(run_id)) == 2
    assert again == row
    assert h.final(run_id).variables["counter"] == 2


# ---- the attempts cap ------------------------------------------------------------------------------


def test_a_task_started_max_attempts_times_may_still_finish(h: LocalEnvironment) -> None:
    run_id = h.submit(sequence(2))
    delivery = h.dispatcher.queue[0]
    # Two earlier deliveries died without finishing: the first (never counted) and a redelivery.
    h.store.l2.start_step(run_id, delivery.task_id, delivery.message.step_id)
    delivery.deliveries = 2
    row = h.settle(run_id)  # the third start is allowed (max_attempts=3)

    assert row.status == "succeeded" and h.final(run_id).variables["counter"] == 2
    assert steps_of(row)["s1"]["attempts"] == 3


def test_a_task_started_more_than_max_attempts_times_fails_the_run(h: LocalEnvironment) -> None:
    run_id = h.submit(sequence(3))
    delivery = h.dispatcher.queue[0]
    # Three starts that never finished (each worker died): the first (never counted), two redeliveries.
    for _ in range(2):
        h.store.l2.start_step(run_id, delivery.task_id, delivery.message.step_id)
    delivery.deliveries = 3
    row = h.settle(run_id)

    assert row.status == "failed"
    assert row.error == "step 's1' was started 3 times without finishing"
    assert h.final(run_id).variables == {"counter": 0} and h.final(run_id).applied_steps == []
    assert row.meta["steps"] == []
    assert [d.message.status for d in h.finalizes(run_id)] == ["failed"]


def test_redeliveries_of_a_step_that_finished_do_not_count_against_the_cap(h: LocalEnvironment) -> None:
    """The cap is for steps whose process keeps dying before they finish; one that finished is
    skipped by each redelivery (which dispatches what follows again, in case that was lost)."""
    run_id = h.submit(sequence(3))
    delivery = h.dispatcher.queue[0]
    h.dispatcher.queue.extend([delivery] * 4)  # five deliveries of one task in a row
    row = h.settle(run_id)

    assert row.status == "succeeded"
    assert h.final(run_id).variables["counter"] == 3  # each step applied once
    assert h.final(run_id).applied_steps == ["s1", "s2", "s3"]


# ---- finalize ---------------------------------------------------------------------------------------


def test_a_second_finalize_returns_false_and_changes_nothing(h: LocalEnvironment) -> None:
    routine = {**sequence(2), "exports": [{"variable": "counter", "destination": "blackboard", "scope": "team:x"}]}
    run_id, row = h.run(routine)
    [finalize] = h.finalizes(run_id)

    assert h.engine.finalize(finalize.message) is False
    h.dispatcher.deliver(h.engine, finalize)  # the broker's copy: same outcome
    after = h.store.ledger.get_run(run_id)
    assert after == row
    assert (after.status, after.meta, after.finished_at) == (row.status, row.meta, row.finished_at)
    assert h.store.l3.blackboard[("team:x", "counter")]["version"] == 1  # not exported twice


# ---- failures -----------------------------------------------------------------------------------------


def test_a_failing_first_step_fails_the_run_once_and_nothing_after_it_runs(h: LocalEnvironment) -> None:
    routine = {"name": "boom", "variables": {"counter": 0}, "steps": [{"id": "f", "action": "fail", "args": {"message": "no quota left"}}, inc("s2"), inc("s3")]}
    run_id, row = h.run(routine)

    assert row.status == "failed" and "no quota left" in row.error and "'f'" in row.error
    assert h.final(run_id).applied_steps == [] and h.final(run_id).variables == {"counter": 0}
    assert list(steps_of(row)) == ["f"] and steps_of(row)["f"]["status"] == "failed"
    assert [d.message.status for d in h.finalizes(run_id)] == ["failed"]
    assert not any(d.kind == "step" and d.message.step_id in ("s2", "s3") for d in h.dispatcher.sent)


def test_two_failing_branches_finalize_the_run_once_with_the_first_error(h: LocalEnvironment) -> None:
    routine = {
        "name": "boom2",
        "steps": [
            {"id": "fan", "parallel": [
                [{"id": "fa", "action": "fail", "args": {"message": "first"}}],
                [{"id": "fb", "action": "fail", "args": {"message": "second"}}],
                [inc("ok1"), inc("ok2")],
            ]},
            inc("after"),
        ],
    }
    run_id, row = h.run(routine)

    assert row.status == "failed" and "first" in row.error and "second" not in row.error
    assert len(h.finalizes(run_id)) == 1
    # fa ran first (FIFO); fb and ok1 were still queued and are skipped once the run has failed.
    assert list(steps_of(row)) == ["fa"]
    assert h.final(run_id).applied_steps == []
    assert not any(d.kind == "step" and d.message.step_id in ("ok2", "after") for d in h.dispatcher.sent)


def test_the_error_of_a_step_that_read_a_secret_is_hidden(h: LocalEnvironment) -> None:
    routine = {
        "name": "leaky",
        "variables": {"token": {"sensitivity": "secret"}, "user": "alice"},
        "steps": [{"id": "call", "action": f"{ME}:leak_secret", "reads": ["token"]}, inc("later")],
    }
    run_id, row = h.run(routine, {"token": SECRET})

    assert row.status == "failed"
    assert row.error == (
        f"step 'call': action '{ME}:leak_secret' raised RuntimeError: <hidden: the step read secret values>"
    )
    assert "later" not in steps_of(row)
    assert SECRET not in repr([d.message for d in h.dispatcher.sent])  # never in a task message
    assert h.final(run_id).variables["token"] == SECRET  # the value itself is kept


def test_a_secret_the_step_did_not_declare_is_absent_to_it(h: LocalEnvironment) -> None:
    routine = {
        "name": "nosy",
        "variables": {"token": {"sensitivity": "secret"}},
        "steps": [{"id": "call", "action": f"{ME}:leak_secret"}],
    }
    run_id, row = h.run(routine, {"token": SECRET})
    # It read nothing sensitive, so its error shows; what it got for the secret was the default.
    assert row.status == "failed" and row.error.endswith("RuntimeError: upstream refused token None"), row.error


def test_an_unimportable_user_action_fails_the_run_naming_it(h: LocalEnvironment) -> None:
    run_id, row = h.run({"name": "missing", "steps": [{"id": "x", "action": f"{ME}:no_such_function"}]})
    assert row.status == "failed" and "no_such_function" in row.error and "cannot be imported" in row.error


def test_incrementing_a_non_number_fails_the_run_naming_the_variable(h: LocalEnvironment) -> None:
    routine = {"name": "bad", "variables": {"counter": "ten"}, "steps": [inc("s1"), inc("s2")]}
    run_id, row = h.run(routine)

    assert row.status == "failed" and "'counter'" in row.error and "not a number" in row.error
    assert list(steps_of(row)) == ["s1"] and h.final(run_id).variables == {"counter": "ten"}


def test_a_value_over_the_limits_fails_the_run_naming_the_variable() -> None:
    h = LocalEnvironment(limits=ResourceLimits(max_value_bytes=64))
    routine = {
        "name": "grow",
        "variables": {"counter": 0},
        "steps": [{"id": "big", "action": "set", "args": {"name": "blob", "value": "x" * 100}}, inc("s2")],
    }
    run_id, row = h.run(routine)

    assert row.status == "failed"
    assert "'blob'" in row.error and "max_value_bytes is 64" in row.error, row.error
    assert steps_of(row)["big"]["status"] == "failed" and "s2" not in steps_of(row)
    assert "blob" not in h.final(run_id).variables


# ---- refused commits ----------------------------------------------------------------------------


def test_a_refused_commit_is_re_applied_on_the_newer_version_and_both_increments_count(h: LocalEnvironment, monkeypatch) -> None:
    conflicts = l2_conflicts()
    run_id = h.submit(sequence(3))
    intrude_before_next_commit(monkeypatch, h.store, lambda ctx: ctx.set_variable("counter", ctx.get("counter") + 10))
    row = h.settle(run_id)

    assert row.status == "succeeded"
    final = h.final(run_id)
    assert final.variables["counter"] == 13
    assert final.applied_steps == ["intruder", "s1", "s2", "s3"]
    assert l2_conflicts() >= conflicts + 1
    assert steps_of(row)["s1"]["attempts"] == 1  # re-applied within the task, not redelivered


SET_CASES = {
    # The step commits after the other writer, so it is the last writer.
    "LAST_WRITER_WINS (default)": (None, "from-step"),
    "PARENT_WINS": ({"default": "PARENT_WINS"}, "from-other"),  # the committed value is kept
    "CHILD_WINS": ({"default": "CHILD_WINS"}, "from-step"),
    "per-variable": ({"default": "CHILD_WINS", "variables": {"owner": "PARENT_WINS"}}, "from-other"),
}


@pytest.mark.parametrize("case", list(SET_CASES))
def test_a_set_meeting_a_concurrent_set_is_resolved_by_the_concurrency_strategy(h: LocalEnvironment, monkeypatch, case: str) -> None:
    concurrency, expected = SET_CASES[case]
    routine = {"name": "race", "variables": {"owner": "initial"}, "steps": [{"id": "claim", "action": "set", "args": {"name": "owner", "value": "from-step"}}]}
    if concurrency is not None:
        routine["concurrency"] = concurrency
    conflicts = l2_conflicts()
    run_id = h.submit(routine)
    intrude_before_next_commit(monkeypatch, h.store, lambda ctx: ctx.set_variable("owner", "from-other"))
    row = h.settle(run_id)

    assert row.status == "succeeded"
    assert h.final(run_id).variables["owner"] == expected
    assert l2_conflicts() >= conflicts + 1


def test_concurrent_sets_of_mappings_under_merge_objects_keep_both_sides(h: LocalEnvironment, monkeypatch) -> None:
    routine = {
        "name": "race-objects",
        "variables": {"cfg": {"a": 1}},
        "concurrency": {"default": "MERGE_OBJECTS"},
        "steps": [{"id": "mine", "action": "set", "args": {"name": "cfg", "value": {"a": 1, "mine": True}}}],
    }
    run_id = h.submit(routine)
    intrude_before_next_commit(monkeypatch, h.store, lambda ctx: ctx.set_variable("cfg", {"a": 2, "theirs": True}))
    row = h.settle(run_id)

    assert row.status == "succeeded"
    assert h.final(run_id).variables["cfg"] == {"a": 1, "theirs": True, "mine": True}


def test_a_set_meeting_a_concurrent_set_under_fail_fails_the_run_naming_the_variable(h: LocalEnvironment, monkeypatch) -> None:
    routine = {
        "name": "race-fail",
        "variables": {"owner": "initial"},
        "concurrency": {"default": "FAIL"},
        "steps": [{"id": "claim", "action": "set", "args": {"name": "owner", "value": "from-step"}}],
    }
    run_id = h.submit(routine)
    intrude_before_next_commit(monkeypatch, h.store, lambda ctx: ctx.set_variable("owner", "from-other"))
    row = h.settle(run_id)

    assert row.status == "failed" and "owner" in row.error
    assert h.final(run_id).variables["owner"] == "from-other"


# ---- infrastructure errors ---------------------------------------------------------------------------


def flaky(monkeypatch, target: Any, name: str, failures: int | None) -> list[int]:
    """Make ``target.name`` raise CommunicationFailure the first ``failures`` calls (None: always)."""
    original = getattr(target, name)
    calls: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if failures is None or len(calls) <= failures:
            raise CommunicationFailure("L2 (Redis)", "down")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)
    return calls


def test_an_infrastructure_error_in_a_step_is_retried_and_the_run_succeeds(h: LocalEnvironment, monkeypatch) -> None:
    run_id = h.submit(sequence(3))
    calls = flaky(monkeypatch, h.store.l2, "commit", failures=2)
    row = h.settle(run_id)

    assert row.status == "succeeded" and h.final(run_id).variables["counter"] == 3
    assert len(calls) == 3 + 2
    assert h.first_step("s1").retries == 2
    assert steps_of(row)["s1"]["attempts"] == 3  # started three times, applied once


def test_an_infrastructure_error_that_outlasts_the_retries_leaves_the_run_to_the_watchdog() -> None:
    """Losing a server costs re-execution, never a run: the step gives up, the run is not failed,
    and once the server is back the watchdog resumes it."""
    from tasks.watchdog import Watchdog

    h = LocalEnvironment(max_retries=2)
    run_id = h.submit(sequence(3))
    mp = pytest.MonkeyPatch()
    try:
        calls = flaky(mp, h.store.l2, "commit", failures=None)
        row = h.settle(run_id)
    finally:
        mp.undo()

    assert len(calls) == 3  # the first try and two retries
    assert row.status == "running" and h.finalizes(run_id) == []
    later = [time.time() + 3600]
    assert Watchdog(h.engine, stall_timeout_s=60, clock=lambda: later[0]).scan() == [run_id]
    row = h.settle(run_id)
    assert row.status == "succeeded" and h.final(run_id).variables["counter"] == 3


def test_an_infrastructure_error_while_committing_is_retried_without_applying_twice(h: LocalEnvironment, monkeypatch) -> None:
    run_id = h.submit(sequence(3))
    flaky(monkeypatch, h.store.l2, "commit", failures=1)
    row = h.settle(run_id)
    assert row.status == "succeeded" and h.final(run_id).variables["counter"] == 3


# ---- write-behind ------------------------------------------------------------------------------------


def test_after_settle_nothing_is_pending_and_l3_equals_l2_with_few_l3_writes(h: LocalEnvironment) -> None:
    run_id, row = h.run(sequence(10))

    assert h.store.l2.pending_flushes() == 0
    in_l2 = h.store.l2.get_context(run_id)
    assert in_l2 is not None and not in_l2.dirty
    assert h.final(run_id).model_dump() == in_l2.context.model_dump()
    assert h.final(run_id).version == 11
    # create + finalize (+ at most a couple of flushes), not one L3 write per step
    assert 2 <= row.meta["l3_writes"] <= 4


def test_a_flush_in_the_middle_of_a_run_writes_l2_to_l3_and_is_counted(h: LocalEnvironment) -> None:
    run_id = h.submit(sequence(4))
    for _ in range(2):
        h.dispatcher.deliver(h.engine, h.dispatcher.queue.popleft())
    assert h.store.l3.get_context(run_id).version == 1  # nothing written behind yet
    assert h.engine.flush(run_id) == 1
    assert h.store.l3.get_context(run_id).version == 3 and h.store.l2.pending_flushes() == 0
    row = h.settle(run_id)

    assert row.status == "succeeded" and h.final(run_id).variables["counter"] == 4
    assert row.meta["l3_writes"] == 3  # create, the flush, finalize
    assert h.store.l2.pending_flushes() == 0


# ---- exports ----------------------------------------------------------------------------------------


EXPORTING = {
    "name": "exporter",
    "variables": {"counter": 0, "token": {"sensitivity": "secret"}},
    "steps": [inc("s1", by=7)],
    "exports": [
        {"variable": "counter", "destination": "blackboard", "scope": "team:ops"},
        {"variable": "token", "destination": "persistent", "key": "api"},
        {"variable": "never_set", "destination": "persistent"},
    ],
}


def test_exports_reach_the_blackboard_and_persistent_exports_with_their_sensitivity(h: LocalEnvironment) -> None:
    run_id, row = h.run(EXPORTING, {"token": SECRET})

    assert row.status == "succeeded"
    board = h.store.l3.blackboard[("team:ops", "counter")]
    assert (board["value"], board["sensitivity"], board["run_id"]) == (7, "public", run_id)
    assert h.store.l3.exports == {(run_id, "api", "default"): {"variable": "token", "value": SECRET, "sensitivity": "secret"}}


def test_a_second_run_replaces_the_blackboard_entry(h: LocalEnvironment) -> None:
    h.run(EXPORTING, {"token": SECRET})
    second, _ = h.run(EXPORTING, {"token": SECRET})
    board = h.store.l3.blackboard[("team:ops", "counter")]
    assert board["version"] == 2 and board["run_id"] == second


def test_a_failed_run_exports_nothing(h: LocalEnvironment) -> None:
    routine = {**EXPORTING, "steps": [inc("s1"), {"id": "f", "action": "fail"}]}
    _, row = h.run(routine, {"token": SECRET})
    assert row.status == "failed"
    assert h.store.l3.blackboard == {} and h.store.l3.exports == {}


# ---- submit -------------------------------------------------------------------------------------------


def test_submit_with_a_variable_over_the_limits_raises_and_stores_nothing() -> None:
    h = LocalEnvironment(limits=ResourceLimits(max_value_bytes=32))
    with pytest.raises(LimitExceeded, match="'big'"):
        h.submit(sequence(2), variables={"big": "x" * 100}, run_id="refused")

    assert h.store.l3.get_run("refused") is None
    assert h.store.l3.get_context("refused") is None
    assert h.store.l3.get_routine("seq") is None
    assert h.dispatcher.sent == []


def test_resubmitting_the_same_routine_reuses_its_stored_version(h: LocalEnvironment) -> None:
    _, first = h.run(sequence(2))
    _, second = h.run(sequence(2))
    _, changed = h.run(sequence(3))
    assert first.routine_version == second.routine_version == 1 and changed.routine_version == 2


def test_a_first_step_subroutine_that_cannot_be_created_does_not_leave_a_running_run(h: LocalEnvironment) -> None:
    routine = {"name": "orphan", "steps": [{"id": "sub", "routine": {"name": "kid", "steps": [inc("k1")]}, "inherit": ["missing"]}]}
    try:
        h.submit(routine, run_id="orphan-run")
    except Exception:
        pass
    h.dispatcher.settle(h.engine)
    row = h.store.l3.get_run("orphan-run")
    assert row is None or row.status == "failed"


def test_a_subroutine_that_cannot_be_created_mid_run_fails_the_run(h: LocalEnvironment) -> None:
    routine = {"name": "bad-child", "steps": [inc("s1"), {"id": "sub", "routine": {"name": "kid", "steps": [inc("k1")]}, "inherit": ["missing"]}]}
    run_id, row = h.run(routine)
    assert row.status == "failed" and "missing" in row.error and "after step 's1'" in row.error, row.error


def test_ten_branches_of_ten_steps_join_once_with_every_increment_counted(h: LocalEnvironment) -> None:
    branches = [[inc(f"b{b}-{i}") for i in range(10)] for b in range(10)]
    run_id, row = h.run({"name": "hundred", "variables": {"counter": 0}, "steps": [{"id": "fan", "parallel": branches}, log_step("after")]})
    assert row.status == "succeeded" and h.final(run_id).variables == {"counter": 100, "log": [100]}


# ---- cancelling --------------------------------------------------------------------------------------


def test_a_cancelled_run_starts_no_further_step_and_ends_cancelled(h: LocalEnvironment) -> None:
    run_id = h.submit(sequence(5))
    for _ in range(2):
        h.dispatcher.deliver(h.engine, h.dispatcher.queue.popleft())
    assert h.engine.cancel(run_id) is True
    row = h.settle(run_id)
    assert row.status == "cancelled" and row.error == "cancelled by request"
    assert h.final(run_id).variables["counter"] == 2 and h.final(run_id).applied_steps == ["s1", "s2"]
    assert len(h.finalizes(run_id)) == 1
    assert h.engine.cancel(run_id) is False  # ended: nothing to cancel
    assert [run.run_id for run in h.store.ledger.list_runs(status="cancelled")] == [run_id]


def test_cancelling_an_unknown_run_says_so(h: LocalEnvironment) -> None:
    from state.errors import NotFound

    with pytest.raises(NotFound, match="does not exist"):
        h.engine.cancel("no-such-run")


def test_step_states_show_where_a_run_stands(h: LocalEnvironment) -> None:
    run_id = h.submit(sequence(4))
    h.dispatcher.deliver(h.engine, h.dispatcher.queue.popleft())  # s1 done, s2 dispatched
    states = h.step_states(run_id)
    assert states["status"] == "running"
    assert [(step["id"], step["state"]) for step in states["steps"]] == [
        ("s1", "done"), ("s2", "running"), ("s3", "pending"), ("s4", "pending")
    ]
    assert states["totals"] == {"done": 1, "running": 1, "pending": 2, "failed": 0, "skipped": 0, "cancelled": 0, "total": 4}
    assert states["steps"][0]["worker"] == "in-process" and states["steps"][0]["attempts"] == 1
    h.settle(run_id)
    final = h.step_states(run_id)
    assert final["status"] == "succeeded" and final["totals"]["done"] == 4 and final["totals"]["running"] == 0


def test_the_steps_a_cancelled_run_never_finished_are_cancelled_not_pending(h: LocalEnvironment) -> None:
    run_id = h.submit(sequence(4))
    h.dispatcher.deliver(h.engine, h.dispatcher.queue.popleft())  # s1 done, s2 dispatched
    assert h.engine.cancel(run_id)
    h.settle(run_id)
    states = h.step_states(run_id)
    assert states["status"] == "cancelled"
    assert [(step["id"], step["state"]) for step in states["steps"]] == [
        ("s1", "done"), ("s2", "cancelled"), ("s3", "cancelled"), ("s4", "cancelled")
    ]
    assert states["totals"] == {"done": 1, "running": 0, "pending": 0, "failed": 0, "skipped": 0, "cancelled": 3, "total": 4}


def test_the_context_tree_shows_each_context_its_tiers_and_masks_sensitive_values(h: LocalEnvironment) -> None:
    routine = {
        "name": "tree",
        "variables": {"counter": 0, "token": {"sensitivity": "secret"}},
        "steps": [inc("s1"), {"id": "sub", "routine": {"name": "kid", "steps": [inc("k1")]}, "inherit": ["counter"]}],
    }
    run_id, row = h.run(routine, {"token": SECRET})
    tree = h.context_tree(run_id)
    assert [ctx["path"] for ctx in tree["contexts"]] == ["", "sub"]
    root, child = tree["contexts"]
    assert root["variables"]["token"] == "***" and root["sensitivity"] == {"token": "secret"}
    assert root["version_l2"] == root["version_l3"] and root["pending_write"] is False
    assert child["parent"] == run_id and child["routine"] == "kid" and child["variables"]["counter"] == 2
    assert SECRET not in repr(tree)


def test_a_user_action_traceback_holds_the_users_frames_only(h: LocalEnvironment) -> None:
    run_id, row = h.run({"name": "bug", "steps": [{"id": "x", "action": f"{ME}:deep_failure"}]})
    assert row.status == "failed" and row.error == f"step 'x': action '{ME}:deep_failure' raised ValueError: the user's own bug"
    trace = steps_of(row)["x"]["traceback"]
    assert trace.startswith("Traceback (most recent call last):\n") and trace.rstrip().endswith("ValueError: the user's own bug")
    assert "in deep_failure" in trace and "in _deeper" in trace
    assert "tasks/steps.py" not in trace and "tasks/actions.py" not in trace  # runctx's frames left out
    assert h.step_states(run_id)["steps"][0]["traceback"] == trace


def test_a_failed_runs_finalize_never_raises_even_when_its_routine_cannot_be_compiled(h: LocalEnvironment, monkeypatch) -> None:
    from state.errors import InvalidRoutine

    run_id = h.submit(sequence(3))
    h.dispatcher.deliver(h.engine, h.dispatcher.queue.popleft())

    def cannot(name: str, version: int) -> None:
        raise InvalidRoutine(f"stored routine {name}@{version}: not what this process can run")

    monkeypatch.setattr(h.engine.plans, "get", cannot)
    assert h.engine.cancel(run_id)
    h.dispatcher.settle(h.engine)  # the cancelled run's finalize, and the steps it leaves: none raises
    assert h.store.ledger.get_run(run_id).status == "cancelled"
