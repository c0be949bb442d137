"""Recovery at engine level: epochs, rewinds from what the tiers still hold, and the watchdog.

Every test runs on the in-memory twins of L2 and L3 with the in-process dispatcher
(`tests.support.engine.Stepwise`, a `runctx.testing.LocalEnvironment`), delivering messages one at
a time so a fault can be placed exactly: no server, milliseconds per test. The faults are
simulated on the twins:

* L2 lost (`lose_l2`): every context entry and the write-behind schedule are gone, and L1 is cleared
  (another process, or this one after a restart). L3 then holds only what was flushed, and the
  in-process dispatcher flushes nothing by itself: a test flushes (`Stepwise.flush`) the versions
  it wants L3 to have.
* An L2 entry corrupted: its payload is damaged (`MemoryL2.raw_context`).
* A lost broker: the dispatcher's queue is cleared. Lost run records: `MemoryL2._runs` is cleared.
* Another process: a second `TieredStore` (own L1) on the same MemoryL2 and MemoryL3 objects.

What every recovery must give: the run ends succeeded with the final context a fault-free run
gives, each step's effect in it exactly once (steps after the last L3 write run again: re-execution,
never loss), the run's epoch raised once per rewind, and messages or writers of an older epoch
refused.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest

from runctx.testing import LocalEnvironment
from state.models import RunContext
from state.tiers import memory as memory_tiers
from state.tiers.data import RunRow
from tasks.advance import resume_points
from tasks.engine import RunEngine
from tasks.plan import Plan, compile_plan
from tasks.routine import parse_routine
from tasks.watchdog import Watchdog
from tests.support.clock import FakeClock
from tests.support.engine import Stepwise, app, ctx_id, inc, log_step, path_of

STALL_S = 60.0


# ---- routines ---------------------------------------------------------------------------------------


def step_ids(n: int) -> list[str]:
    return [f"s{i:02}" for i in range(n)]


def counting(n: int = 30) -> dict[str, Any]:
    """n steps alternating: increment the counter, append the step's number to the log."""
    steps = [inc(sid) if i % 2 == 0 else app(sid, i) for i, sid in enumerate(step_ids(n))]
    return {"name": "counting", "variables": {"counter": 0, "log": []}, "steps": steps}


def counted(n: int) -> dict[str, Any]:
    """What `counting(n)` ends with."""
    return {"counter": (n + 1) // 2, "log": list(range(1, n, 2))}


def fan(branches: int = 4, length: int = 5) -> dict[str, Any]:
    parallel = [[inc(f"{b}{i}") for i in range(1, length + 1)] for b in "abcdefgh"[:branches]]
    return {"name": "fan", "variables": {"counter": 0}, "steps": [{"id": "fan", "parallel": parallel}, log_step("after")]}


def with_child() -> dict[str, Any]:
    """a, then sub-routine c (inherits the counter, adds 30 in three steps), then `after` logs it."""
    child = {"name": "kid", "steps": [inc("c1", 10), inc("c2", 10), inc("c3", 10)]}
    steps = [inc("a"), {"id": "c", "routine": child, "inherit": ["counter"]}, log_step("after")]
    return {"name": "parent", "variables": {"counter": 0}, "steps": steps}


def with_grandchild() -> dict[str, Any]:
    """a, then sub-routine c (c1, sub-routine g (g1), c2), then `after`."""
    grandchild = {"name": "gc", "steps": [inc("g1", 100)]}
    child = {"name": "kid", "steps": [inc("c1", 10), {"id": "g", "routine": grandchild, "inherit": ["counter"]}, inc("c2", 10)]}
    steps = [inc("a"), {"id": "c", "routine": child, "inherit": ["counter"]}, log_step("after")]
    return {"name": "nested", "variables": {"counter": 0}, "steps": steps}


def fault_free(routine: dict[str, Any], path: str = "") -> RunContext:
    """The final context of the same routine run without faults."""
    env = LocalEnvironment()
    run_id, row = env.run(routine)
    assert row.status == "succeeded"
    return env.final(run_id, path)


def assert_once_each(ctx: RunContext, expected: list[str]) -> None:
    assert sorted(ctx.applied_steps) == sorted(expected), ctx.applied_steps
    assert len(ctx.applied_steps) == len(set(ctx.applied_steps)), "a step applied twice"


def attempts(row: RunRow) -> dict[str, int]:
    return {step["id"]: step["attempts"] for step in row.meta["steps"]}


@pytest.fixture
def h() -> Stepwise:
    return Stepwise()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """One fake clock for the watchdog and the ledger's timestamps (L3 ``updated_at``: creation,
    rewind), so "no progress for N seconds" is measured on it."""
    fake = FakeClock()
    monkeypatch.setattr(memory_tiers.l3, "_now", lambda: dt.datetime.fromtimestamp(fake.now, dt.UTC))
    return fake


# ---- L2 lost ----------------------------------------------------------------------------------------


def test_losing_l2_mid_sequence_reruns_the_steps_after_the_last_l3_write_and_ends_exactly_once(h: Stepwise) -> None:
    run_id = h.submit(counting(30))
    h.deliver(10)  # s00..s09 applied
    h.flush(run_id)  # L3: version 11
    h.deliver(8)  # s10..s17 applied in L2 only
    h.lose_l2()
    h.drain()

    row = h.row(run_id)
    assert row.status == "succeeded" and row.epoch == 2
    assert h.engine.rewinds == 1
    final = h.final(run_id)
    assert final.variables == counted(30) == fault_free(counting(30)).variables
    assert final.applied_steps == step_ids(30)  # each once, in order
    assert final.epoch == 2 and final.version == 31
    # Re-execution, never loss: epoch 2 starts right after the flushed version.
    assert h.sent_steps(epoch=2) == step_ids(30)[10:]
    assert h.sent_steps(epoch=1) == step_ids(30)[:19]  # s18 found its state lost and asked for the rewind
    # Each step's record is its applying start's: the re-executed ones were new messages, started once.
    assert all(count == 1 for count in attempts(row).values())
    assert len(h.finalizes(run_id)) == 1


def test_losing_l2_twice_rewinds_twice_and_ends_in_epoch_3_exactly_once(h: Stepwise) -> None:
    run_id = h.submit(counting(30))
    h.deliver(6)
    h.flush(run_id)  # L3: s00..s05
    h.deliver(6)
    h.lose_l2()
    h.deliver(1)  # s12 of epoch 1: lineage lost -> rewind to epoch 2, resume at s06
    assert h.row(run_id).epoch == 2 and h.sent_steps(epoch=2) == ["s06"]
    h.deliver(10)  # s06..s15 in epoch 2
    h.flush(run_id)  # L3: up to s15, epoch 2
    h.deliver(5)  # s16..s20
    h.lose_l2()
    h.drain()

    row = h.row(run_id)
    assert row.status == "succeeded" and row.epoch == 3 and h.engine.rewinds == 2
    final = h.final(run_id)
    assert final.variables == counted(30)
    assert final.applied_steps == step_ids(30)
    assert h.sent_steps(epoch=3) == step_ids(30)[16:]


def test_a_corrupt_l2_entry_mid_run_rewinds_from_l3_and_ends_exactly_once(h: Stepwise) -> None:
    run_id = h.submit(counting(20))
    h.deliver(7)
    h.flush(run_id)
    h.deliver(5)
    entry = h.store.l2.raw_context(run_id)
    assert entry is not None
    entry.payload = entry.payload[:-12] + b"\x00garbage...."
    h.store.l1.clear()  # the next step runs in a process that has no copy of its own
    h.drain()
    assert h.store.l2.raw_context(run_id).epoch == 2  # the corrupt entry was dropped, the lineage rebuilt

    row = h.row(run_id)
    assert row.status == "succeeded" and row.epoch == 2
    assert h.final(run_id).variables == counted(20)
    assert h.final(run_id).applied_steps == step_ids(20)
    assert h.sent_steps(epoch=2) == step_ids(20)[7:]


def test_a_readers_copy_filled_from_l3_after_the_loss_is_not_taken_for_the_live_lineage(h: Stepwise) -> None:
    run_id = h.submit(counting(12))
    h.deliver(4)
    h.flush(run_id)
    h.deliver(4)
    h.lose_l2()
    reader = h.other_process()
    assert reader.store.get_context(run_id).version == 5  # a status read fills L2 from L3
    entry = h.store.l2.raw_context(run_id)
    assert entry is not None and not entry.live
    h.drain()

    row = h.row(run_id)
    assert row.status == "succeeded" and row.epoch == 2
    assert h.final(run_id).variables == counted(12)
    assert h.final(run_id).applied_steps == step_ids(12)
    assert h.sent_steps(epoch=2) == step_ids(12)[4:]


# ---- stale messages and writers -----------------------------------------------------------------------


def test_a_step_message_from_before_a_rewind_is_refused_and_changes_nothing(h: Stepwise) -> None:
    run_id = h.submit(counting(12))
    h.deliver(3)
    h.flush(run_id)  # L3: s00..s02
    stale = h.dispatcher.queue[0]  # s03 of epoch 1: kept, as a broker would redeliver it
    h.deliver(3)  # s03..s05 applied in epoch 1
    h.lose_l2()
    h.deliver(1)  # s06 of epoch 1: rewind, epoch 2 resumes at s03
    before = h.live(run_id)
    assert before.epoch == 2 and "s03" not in before.applied_steps

    assert h.engine.execute_step(stale.message, task_id=stale.task_id, worker="late") is None
    after = h.live(run_id)
    assert (after.version, after.epoch, after.applied_steps) == (before.version, 2, before.applied_steps)

    h.drain()
    assert h.row(run_id).status == "succeeded"
    assert h.final(run_id).variables == counted(12)
    assert h.final(run_id).applied_steps == step_ids(12)


def test_a_writer_whose_context_was_rewound_under_it_is_refused_and_the_step_applies_once(
    h: Stepwise, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = h.submit(counting(10))
    h.deliver(4)
    other = h.other_process()  # detects the loss first (here: rewinds while our step runs)
    original = h.store.l2.commit
    rewound: list[bool] = []
    busy: list[bool] = []

    def commit(request: Any, **kwargs: Any) -> Any:
        if not busy and request.step_id:  # our step's commit: the rewind lands just before it
            busy.append(True)  # (the rewind's own commits pass through)
            rewound.append(other.engine.rewind(run_id, 1))
        return original(request, **kwargs)

    monkeypatch.setattr(h.store.l2, "commit", commit)
    delivery = h.dispatcher.queue.popleft()  # s04, epoch 1
    assert h.engine.execute_step(delivery.message, task_id=delivery.task_id, worker="slow") is None
    assert rewound == [True]
    live = h.live(run_id)
    assert live.epoch == 2 and "s04" not in live.applied_steps and live.version == 5
    assert h.sent_steps(epoch=2) == ["s04"]  # the rewind re-dispatched it

    h.drain()
    assert h.row(run_id).status == "succeeded" and h.row(run_id).epoch == 2
    assert h.final(run_id).variables == counted(10)
    assert h.final(run_id).applied_steps == step_ids(10)


def test_two_processes_detecting_the_same_loss_rewind_once(h: Stepwise) -> None:
    run_id = h.submit(counting(12))
    h.deliver(5)
    h.flush(run_id)
    h.deliver(3)
    h.lose_l2()
    other = h.other_process()
    sent_before = len(h.dispatcher.sent)
    barrier = threading.Barrier(2)
    results: dict[str, bool] = {}

    def rewind(name: str, engine: RunEngine) -> None:
        barrier.wait()
        results[name] = engine.rewind(run_id, 1)

    threads = [threading.Thread(target=rewind, args=(name, e.engine)) for name, e in (("this", h), ("other", other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert sorted(results.values()) == [False, True]
    assert h.row(run_id).epoch == 2
    resumed = h.dispatcher.sent[sent_before:]
    assert [(d.message.step_id, d.message.epoch) for d in resumed] == [("s05", 2)]  # one resume, not two
    assert h.engine.rewind(run_id, 1) is False  # a late third detector changes nothing either

    h.drain()  # the queued s08 of epoch 1 is refused
    assert h.row(run_id).status == "succeeded" and h.row(run_id).epoch == 2
    assert h.final(run_id).variables == counted(12)
    assert h.final(run_id).applied_steps == step_ids(12)


def test_a_finalize_from_before_a_rewind_is_refused_and_the_new_epochs_finalize_succeeds(h: Stepwise) -> None:
    run_id = h.submit(counting(6))
    old = h.deliver_until_finalize()
    h.dispatcher.queue.clear()
    assert h.engine.rewind(run_id, 1)  # e.g. another process found the lineage lost
    new = h.dispatcher.queue[0]
    assert (new.kind, new.message.epoch, old.message.epoch) == ("finalize", 2, 1)

    assert h.engine.finalize(old.message) is False
    assert h.row(run_id).status == "running"
    assert h.engine.finalize(new.message) is True
    row = h.row(run_id)
    assert row.status == "succeeded" and row.epoch == 2
    assert h.final(run_id).variables == counted(6) and h.final(run_id).applied_steps == step_ids(6)
    assert h.engine.finalize(new.message) is False  # and only once


# ---- parallel groups and sub-routines ---------------------------------------------------------------


def test_losing_l2_in_a_parallel_group_resumes_each_branch_and_joins_once(h: Stepwise) -> None:
    routine = fan(4, 5)
    run_id = h.submit(routine)
    h.deliver(8)  # two steps of each branch
    h.flush(run_id)
    h.deliver(6)  # a third of each, a fourth of a and b: in L2 only
    h.lose_l2()
    h.drain()

    row = h.row(run_id)
    assert row.status == "succeeded" and row.epoch == 2
    final = h.final(run_id)
    assert final.variables == {"counter": 20, "log": [20]} == fault_free(routine).variables
    assert_once_each(final, [f"{b}{i}" for b in "abcd" for i in range(1, 6)] + ["after"])
    assert final.applied_steps[-1] == "after"
    assert sorted(h.sent_steps(epoch=2)) == sorted([f"{b}{i}" for b in "abcd" for i in range(3, 6)] + ["after"])
    assert h.sent_steps(epoch=1).count("after") == 0 and h.sent_steps(epoch=2).count("after") == 1


def test_losing_l2_while_a_child_runs_continues_the_child_from_l3(h: Stepwise) -> None:
    run_id = h.submit(with_child())
    h.deliver(1)  # a; the child is created (in L3 at once)
    h.flush(run_id)  # L3 has the root with a applied
    h.deliver(2)  # c1, c2 in L2 only
    h.lose_l2()
    resume = h.resume_from_l3(run_id)
    assert [h.plan(run_id).node(i).step_id for i, _ in resume.points] == ["c/c1"] and resume.orphans == []
    h.drain()

    row = h.row(run_id)
    assert row.status == "succeeded" and row.epoch == 2
    assert h.final(run_id).variables == {"counter": 31, "log": [31]} == fault_free(with_child()).variables
    assert h.final(run_id).applied_steps == ["a", "c", "after"]
    assert h.final(run_id, "c").applied_steps == ["c/c1", "c/c2", "c/c3"]


def test_a_child_whose_creation_the_rebuilt_parent_has_not_reached_is_discarded_and_made_again(
    h: Stepwise, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = h.submit(with_child())
    h.deliver(2)  # a (root in L2 only), then c1: the child exists in L3
    h.flush(run_id, "c")  # L3: the child with c1, the root still without a
    h.lose_l2()
    resume = h.resume_from_l3(run_id)
    assert [h.plan(run_id).node(i).step_id for i, _ in resume.points] == ["a"] and resume.orphans == ["c"]
    discarded: list[str] = []
    original = h.store.rewinds.discard_context
    monkeypatch.setattr(h.store.rewinds, "discard_context", lambda cid: (discarded.append(cid), original(cid))[1])
    h.drain()

    assert discarded == [f"{run_id}/c"]
    row = h.row(run_id)
    assert row.status == "succeeded" and row.epoch == 2
    assert h.final(run_id).variables == {"counter": 31, "log": [31]} == fault_free(with_child()).variables
    assert h.final(run_id).applied_steps == ["a", "c", "after"]
    child = h.final(run_id, "c")
    assert child.epoch == 2 and child.applied_steps == ["c/c1", "c/c2", "c/c3"]  # made again, c1 once


def test_a_grandchild_of_an_orphaned_child_is_discarded_too_and_the_run_goes_on(h: Stepwise) -> None:
    run_id = h.submit(with_grandchild())
    h.deliver(4)  # a (root in L2 only), c1, g1, the merge of g into c
    h.flush(run_id, "c")  # L3: c with g merged; the root still without a
    h.flush(run_id, "c/g")
    h.lose_l2()
    h.drain()

    assert h.row(run_id).status == "succeeded"
    assert h.final(run_id).variables == fault_free(with_grandchild()).variables


# ---- the watchdog -------------------------------------------------------------------------------------


@pytest.mark.parametrize("l2_lost", [False, True], ids=["l2-intact", "l2-lost"])
def test_a_lost_finalize_is_sent_again_by_the_watchdog(h: Stepwise, clock: FakeClock, l2_lost: bool) -> None:
    run_id = h.submit(counting(6))
    h.deliver_until_finalize()
    h.dispatcher.queue.clear()  # the finalize never ran
    if l2_lost:
        h.flush(run_id)
        h.lose_l2()
        assert h.plan(run_id).node(h.resume_from_l3(run_id).points[0][0]).kind == "finish"
    watchdog = Watchdog(h.engine, stall_timeout_s=STALL_S, clock=clock)

    assert watchdog.scan() == []
    clock.advance(STALL_S - 1)
    assert watchdog.scan() == []
    clock.advance(2)
    assert watchdog.scan() == [run_id]
    assert [(d.kind, d.message.epoch) for d in h.dispatcher.queue] == [("finalize", 2)]  # the frontier is the finish
    h.drain()

    row = h.row(run_id)
    assert row.status == "succeeded" and row.epoch == 2
    assert h.final(run_id).variables == counted(6) and h.final(run_id).applied_steps == step_ids(6)
    assert watchdog.scan() == []


def test_the_watchdog_leaves_a_run_alone_while_its_steps_touch_progress(h: Stepwise, clock: FakeClock) -> None:
    run_id = h.submit(counting(4))
    h.deliver(1)
    h.dispatcher.queue.popleft()  # s01 is taken by a worker that runs it for a long time
    watchdog = Watchdog(h.engine, stall_timeout_s=STALL_S, clock=clock)
    for _ in range(10):  # ten minutes, alive every half minute
        clock.advance(STALL_S / 2)
        h.store.l2.touch_progress([run_id], clock())
        assert watchdog.scan() == []
    assert h.row(run_id).epoch == 1 and h.engine.rewinds == 0
    clock.advance(STALL_S + 1)  # the worker died
    assert watchdog.scan() == [run_id]
    h.drain()
    assert h.row(run_id).status == "succeeded" and h.final(run_id).variables == counted(4)


def test_a_redis_that_came_back_empty_is_noticed_at_the_next_heartbeat_not_after_the_stall_timeout(
    h: Stepwise, clock: FakeClock
) -> None:
    run_id = h.submit(counting(6))
    h.deliver(2)
    leader = Watchdog(h.engine, stall_timeout_s=STALL_S, clock=clock)
    other = Watchdog(h.engine, stall_timeout_s=STALL_S, clock=clock)  # another process's
    assert not leader.check_continuity() and not other.check_continuity()
    clock.advance(1)
    assert not leader.check_continuity() and leader.scan() == []  # a heartbeat on: nothing went back

    h.flush(run_id)
    h.dispatcher.queue.clear()  # the broker's messages went with Redis
    h.lose_l2()
    clock.advance(1)
    assert leader.check_continuity()  # its count went back
    assert leader.scan() == [run_id]  # at once: not a stall timeout later
    assert other.check_continuity() and other.scan() == []  # the same loss acts once per run
    h.drain()
    assert h.row(run_id).status == "succeeded"
    assert h.final(run_id).variables == counted(6) and h.final(run_id).applied_steps == step_ids(6)


def test_a_run_submitted_after_redis_went_back_is_not_resumed_for_it(h: Stepwise, clock: FakeClock) -> None:
    watchdog = Watchdog(h.engine, stall_timeout_s=STALL_S, clock=clock)
    watchdog.check_continuity()
    h.lose_l2()
    clock.advance(1)
    assert watchdog.check_continuity()
    clock.advance(1)
    run_id = h.submit(counting(3))  # queued after the loss: it only waits for its worker
    assert watchdog.scan() == []
    h.drain()
    assert h.row(run_id).status == "succeeded" and h.engine.rewinds == 0


def test_a_run_whose_message_waits_in_the_queue_is_not_resumed_however_long_it_waits(h: Stepwise, clock: FakeClock) -> None:
    run_id = h.submit(counting(4))
    h.deliver(1)  # s01's message waits behind a long queue
    watchdog = Watchdog(h.engine, stall_timeout_s=STALL_S, clock=clock, backlog=lambda: len(h.dispatcher.queue))
    for _ in range(10):
        clock.advance(STALL_S)
        assert watchdog.scan() == []
    assert h.row(run_id).epoch == 1 and h.engine.rewinds == 0
    h.dispatcher.queue.clear()  # the broker lost it: the queues are empty and the run has not moved ...
    assert watchdog.scan() == []  # ... but a message taken just now would have its heartbeat soon
    clock.advance(STALL_S)
    assert watchdog.scan() == [run_id]
    h.drain()
    assert h.row(run_id).status == "succeeded" and h.final(run_id).variables == counted(4)


def test_a_broker_that_cannot_say_what_it_holds_makes_no_resume(h: Stepwise, clock: FakeClock) -> None:
    def unreachable() -> int:
        raise ConnectionError("broker down")

    run_id = h.submit(counting(2))
    watchdog = Watchdog(h.engine, stall_timeout_s=STALL_S, clock=clock, backlog=unreachable)
    clock.advance(STALL_S * 4)
    assert watchdog.scan() == [] and h.row(run_id).epoch == 1


def test_a_stall_is_confirmed_one_heartbeat_later_so_lost_progress_records_come_back_first(
    h: Stepwise, clock: FakeClock
) -> None:
    """Redis lost the progress records of a run whose long step still runs: the run looks stalled
    until the step's next heartbeat; the watchdog waits that long before it believes it."""
    run_id = h.submit(counting(4))
    h.deliver(1)
    h.dispatcher.queue.popleft()  # s01 runs for a long time on some worker
    watchdog = Watchdog(h.engine, stall_timeout_s=STALL_S, confirm_after_s=5, clock=clock)
    clock.advance(STALL_S + 1)  # its progress record was lost with Redis
    assert watchdog.scan() == []  # looks stalled: noticed, not believed yet
    clock.advance(2)
    h.store.l2.touch_progress([run_id], clock())  # the heartbeat of the running step
    clock.advance(4)
    assert watchdog.scan() == [] and h.row(run_id).epoch == 1
    clock.advance(STALL_S + 1)  # now the worker is gone: no heartbeat any more
    assert watchdog.scan() == []
    clock.advance(5)
    assert watchdog.scan() == [run_id]


def test_a_run_resumed_once_waits_twice_the_stall_timeout_before_the_next_resume(h: Stepwise, clock: FakeClock) -> None:
    run_id = h.submit(counting(4))
    h.deliver_until_finalize()
    h.dispatcher.queue.clear()
    watchdog = Watchdog(h.engine, stall_timeout_s=STALL_S, clock=clock)
    clock.advance(STALL_S + 1)
    assert watchdog.scan() == [run_id]
    h.dispatcher.queue.clear()  # the resumed finalize is lost too

    clock.advance(STALL_S + 1)
    assert watchdog.scan() == []  # one timeout after the resume: not yet
    clock.advance(STALL_S - 3)
    assert watchdog.scan() == []  # just under two
    clock.advance(3)
    assert watchdog.scan() == [run_id]  # two timeouts after the resume
    assert h.row(run_id).epoch == 3
    h.drain()
    assert h.row(run_id).status == "succeeded" and h.final(run_id).applied_steps == step_ids(4)


@pytest.mark.parametrize("after_steps", [0, 3], ids=["at-submit", "mid-run"])
def test_a_broker_that_lost_every_message_is_recovered_by_the_watchdog(
    h: Stepwise, clock: FakeClock, after_steps: int
) -> None:
    run_id = h.submit(counting(8))
    h.deliver(after_steps)
    h.dispatcher.queue.clear()
    watchdog = Watchdog(h.engine, stall_timeout_s=STALL_S, clock=clock)
    assert watchdog.scan() == []
    clock.advance(STALL_S + 1)
    assert watchdog.scan() == [run_id]
    h.drain()

    row = h.row(run_id)
    assert row.status == "succeeded" and row.epoch == 2
    assert h.final(run_id).variables == counted(8) and h.final(run_id).applied_steps == step_ids(8)
    assert h.sent_steps(epoch=2) == step_ids(8)[after_steps:]  # L2 was intact: nothing ran twice


def test_a_failed_run_whose_failure_finalize_was_lost_ends_failed_after_the_watchdog(
    h: Stepwise, clock: FakeClock
) -> None:
    run_id = h.submit({"name": "doomed", "variables": {"counter": 0}, "steps": [inc("a"), {"id": "boom", "action": "fail"}]})
    h.deliver(2)
    assert [(d.kind, d.message.status) for d in h.dispatcher.queue] == [("finalize", "failed")]
    h.dispatcher.queue.clear()  # the failure's finalize is lost
    watchdog = Watchdog(h.engine, stall_timeout_s=STALL_S, clock=clock)
    for _ in range(3):
        clock.advance(10 * STALL_S)
        watchdog.scan()
        h.drain()

    assert h.row(run_id).status == "failed"


# ---- run records ------------------------------------------------------------------------------------


def test_lost_run_records_do_not_stop_a_run(h: Stepwise) -> None:
    run_id = h.submit(counting(10))
    h.deliver(5)
    h.store.l2._runs.clear()  # attempts, step reports, progress: all gone
    h.drain()

    row = h.row(run_id)
    assert row.status == "succeeded" and row.epoch == 1
    assert h.final(run_id).variables == counted(10) and h.final(run_id).applied_steps == step_ids(10)
    assert set(attempts(row)) == set(step_ids(10)[5:])  # the report only knows what followed


def test_lost_run_records_and_lost_l2_together_still_end_exactly_once(h: Stepwise) -> None:
    run_id = h.submit(counting(10))
    h.deliver(3)
    h.flush(run_id)
    h.deliver(3)
    h.lose_l2()
    h.store.l2._runs.clear()
    h.drain()

    row = h.row(run_id)
    assert row.status == "succeeded" and row.epoch == 2
    assert h.final(run_id).variables == counted(10) and h.final(run_id).applied_steps == step_ids(10)


def test_a_child_context_lost_while_a_redelivered_step_dispatches_rewinds_at_once(h: Stepwise) -> None:
    run_id = h.submit(with_child())
    first = h.dispatcher.queue.popleft()
    h.dispatcher.deliver(h.engine, first)  # a applied, child created
    h.dispatcher.queue.clear()  # the worker died before its acknowledgement: a is redelivered
    entry = h.store.l2.raw_context(f"{run_id}/c")
    assert entry is not None
    entry.payload = b"damaged"
    h.store.l1.clear()
    h.dispatcher.deliver(h.engine, first)
    h.drain()

    assert h.row(run_id).status == "succeeded"
    assert h.final(run_id).variables == {"counter": 31, "log": [31]}


# ---- resume_points on compiled plans -----------------------------------------------------------------


def plan_of(routine: dict[str, Any]) -> Plan:
    return compile_plan(parse_routine(routine))


def at(plan: Plan, step_id: str, kind: str | None = None) -> tuple[int, tuple[int, ...]]:
    """The resume point at the node with ``step_id`` (outside any fan-out item)."""
    return next(n.index for n in plan.nodes if n.step_id == step_id and (kind is None or n.kind == kind)), ()


def ctx(path: str, *applied: str) -> RunContext:
    return RunContext(context_id=ctx_id("r", path), run_id="r", routine_id="x", applied_steps=list(applied))


def contexts(*items: RunContext) -> dict[str, RunContext]:
    return {path_of("r", c.context_id): c for c in items}


def test_resume_points_of_a_half_applied_sequence_is_its_next_step() -> None:
    plan = plan_of(counting(6))
    resume = resume_points(plan, contexts(ctx("", "s00", "s01", "s02")))
    assert resume.points == [at(plan, "s03")] and resume.orphans == []
    assert resume_points(plan, contexts(ctx(""))).points == [at(plan, "s00")]


def test_resume_points_of_a_parallel_group_are_each_unfinished_branchs_next_step() -> None:
    routine = {
        "name": "p",
        "variables": {"counter": 0},
        "steps": [
            inc("pre"),
            {"id": "par", "parallel": [[inc("a1"), inc("a2")], [inc("b1"), inc("b2")], [inc("c1")]]},
            inc("post"),
        ],
    }
    plan = plan_of(routine)
    resume = resume_points(plan, contexts(ctx("", "pre", "a1", "a2", "b1")))
    assert sorted(resume.points) == sorted([at(plan, "b2"), at(plan, "c1")])
    assert resume_points(plan, contexts(ctx("", "pre", "a1", "a2", "b1", "b2"))).points == [at(plan, "c1")]
    assert resume_points(plan, contexts(ctx("", "pre", "a1", "a2", "b1", "b2", "c1"))).points == [at(plan, "post")]
    assert resume_points(plan, contexts(ctx(""))).points == [at(plan, "pre")]


def test_resume_points_of_a_fully_applied_run_is_the_finish() -> None:
    plan = plan_of(counting(4))
    ((point, _),) = resume_points(plan, contexts(ctx("", *step_ids(4)))).points
    assert plan.node(point).kind == "finish"


def test_resume_points_around_a_subroutine() -> None:
    plan = plan_of(with_child())
    # merged already: the child is history (skipped, not an orphan), whether or not its context is there
    for merged in (contexts(ctx("", "a", "c")), contexts(ctx("", "a", "c"), ctx("c", "c/c1", "c/c2", "c/c3"))):
        resume = resume_points(plan, merged)
        assert resume.points == [at(plan, "after")] and resume.orphans == []
    # the child not created yet: its start
    ((point, _),) = resume_points(plan, contexts(ctx("", "a"))).points
    assert plan.node(point).kind == "child_start" and plan.node(point).child_context == "c"
    # the child created: its own next step
    resume = resume_points(plan, contexts(ctx("", "a"), ctx("c", "c/c1")))
    assert resume.points == [at(plan, "c/c2")] and resume.orphans == []
    # every child step applied, the merge not: the merge
    all_child_steps = contexts(ctx("", "a"), ctx("c", "c/c1", "c/c2", "c/c3"))
    assert resume_points(plan, all_child_steps).points == [at(plan, "c", "child_end")]
    # the parent rebuilt from before the child's start: the child is an orphan
    resume = resume_points(plan, contexts(ctx(""), ctx("c", "c/c1")))
    assert resume.points == [at(plan, "a")] and resume.orphans == ["c"]


def test_resume_points_report_a_grandchild_of_an_orphan_as_an_orphan() -> None:
    plan = plan_of(with_grandchild())
    resume = resume_points(plan, contexts(ctx(""), ctx("c", "c/c1", "c/g"), ctx("c/g", "c/g/g1")))
    assert resume.points == [at(plan, "a")]
    assert resume.orphans == ["c", "c/g"]
