"""Recovery at engine level on the real tiers (Redis and PostgreSQL), in-process: a step message from
before a rewind is refused, and garbage met in L2 where no read checks it first (a step reading
from L1, a finalize after its L3 write) costs a rewind, never a run.

The same faults on real worker processes are in tests/e2e/test_recovery.py; on the in-memory twins,
message by message, in tests/tasks/test_recovery_engine.py.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from runctx.testing import Delivery, LocalEnvironment
from state.store import TieredStore
from tasks.routine import parse_routine


# ---- a step message from before a rewind ------------------------------------------------------------


def _engine_on(store: TieredStore) -> tuple[Any, Any]:
    """The engine and the in-process dispatcher of a `LocalEnvironment` on ``store`` (the real tiers)."""
    env = LocalEnvironment(store=store, max_attempts=5)
    return env.engine, env.dispatcher


def _short_sequence(n: int = 8) -> Any:
    steps = [
        {"id": f"s{i}", "action": "increment", "args": {"name": "counter", "by": i}} if i % 2
        else {"id": f"s{i}", "action": "append", "args": {"name": "log", "value": f"s{i}"}}
        for i in range(1, n + 1)
    ]
    routine = parse_routine({"name": "short", "variables": {"counter": 0, "log": []}, "steps": steps})
    expected = {"counter": sum(i for i in range(1, n + 1) if i % 2), "log": [f"s{i}" for i in range(1, n + 1) if i % 2 == 0]}
    return routine, expected


def _step_ids(routine: Any) -> list[str]:
    return [step.id for step in routine.steps]


def _assert_final_once(store: TieredStore, run_id: str, routine: Any, expected: dict[str, Any]) -> None:
    row = store.ledger.get_run(run_id)
    assert row is not None and row.status == "succeeded", (row.status, row.error) if row else None
    final = store.l3.get_context(run_id)
    assert Counter(final.applied_steps) == Counter(_step_ids(routine))
    assert final.version == 1 + len(_step_ids(routine))
    assert final.variables == expected


def test_a_step_message_from_before_a_rewind_is_refused_not_applied(store: TieredStore, caplog: pytest.LogCaptureFixture) -> None:
    engine, dispatcher = _engine_on(store)
    routine, expected = _short_sequence()
    run_id = engine.submit(routine)

    def deliver_next() -> Delivery:
        delivery = dispatcher.queue.popleft()
        dispatcher.deliver(engine, delivery)
        return delivery

    for _ in range(3):
        deliver_next()
    assert store.flush(run_id)  # L3 holds s1..s3 (as the write-behind would have written)
    deliver_next()  # s4: in L2 only
    stale = dispatcher.queue[0]  # s5 of epoch 1, sent after s4 committed
    assert stale.kind == "step" and stale.message.step_id == "s5" and stale.message.epoch == 1
    kept = Delivery(stale.kind, stale.message, task_id=stale.task_id)  # a broker redelivers with the same id

    # L2 loses the context (as after a wipe), and so does this process's L1.
    store.l2.client.delete(store.l2.keys.context(run_id))
    store.l1.clear()

    # The next step finds its state gone: the run is rewound to epoch 2 from L3's snapshot (s1..s3).
    with caplog.at_level("INFO"):
        deliver_next()
    assert engine.rewinds == 1 and store.ledger.get_run(run_id).epoch == 2
    assert "rewound to epoch 2" in caplog.text
    resumed = dispatcher.queue[0]
    assert (resumed.message.step_id, resumed.message.epoch) == ("s4", 2)
    deliver_next()  # s4 again, in epoch 2: the context is at version 5 now, as the stale s5 message asks
    rebuilt = store.l2.get_context(run_id)
    assert (rebuilt.context.epoch, rebuilt.version, rebuilt.context.applied_steps) == (2, 5, ["s1", "s2", "s3", "s4"])
    queued = list(dispatcher.queue)

    # The kept message of epoch 1 is refused: nothing applied, nothing dispatched.
    caplog.clear()
    with caplog.at_level("INFO"):
        assert engine.execute_step(kept.message, task_id=kept.task_id, worker="stale") is None
    assert "refused" in caplog.text
    after = store.l2.get_context(run_id)
    assert (after.context.epoch, after.version, after.context.applied_steps) == (2, 5, ["s1", "s2", "s3", "s4"])
    assert list(dispatcher.queue) == queued

    dispatcher.settle(engine)
    _assert_final_once(store, run_id, routine, expected)
    finalizes = [d for d in dispatcher.sent if d.kind == "finalize"]
    assert len(finalizes) == 1 and finalizes[0].message.epoch == 2


# ---- garbage in L2 met where no read checks it first --------------------------------------------------


def _garble_fields(store: TieredStore, context_id: str) -> None:
    key = store.l2.keys.context(context_id)
    store.l2.client.hset(key, mapping={field: b"garbage" for field in store.l2.client.hkeys(key)})


def test_a_step_reading_from_l1_meets_garbage_in_l2_at_commit_the_run_rewinds(store: TieredStore, caplog: pytest.LogCaptureFixture) -> None:
    """The process that committed a step runs the next one too: it reads its context from L1 (no checksum
    check) and meets the garbage only in the commit's compare-and-set."""
    engine, dispatcher = _engine_on(store)
    routine, expected = _short_sequence()
    run_id = engine.submit(routine)
    for _ in range(2):
        dispatcher.deliver(engine, dispatcher.queue.popleft())
    assert store.l1.context_version(run_id) == 3  # the next step reads L1
    _garble_fields(store, run_id)
    with caplog.at_level("INFO"):
        dispatcher.deliver(engine, dispatcher.queue.popleft())  # as Celery would: a bug in a step fails its run
    failed = [record.getMessage() for record in caplog.records if "could not run" in record.getMessage()]
    assert not failed and engine.rewinds == 1, f"the step did not rewind the run: {failed}"
    dispatcher.settle(engine)
    _assert_final_once(store, run_id, routine, expected)


def test_finalize_meeting_garbage_in_l2_after_its_l3_write_does_not_raise(store: TieredStore) -> None:
    engine, dispatcher = _engine_on(store)
    routine, expected = _short_sequence(3)
    run_id = engine.submit(routine)
    while dispatcher.queue[0].kind != "finalize":
        dispatcher.deliver(engine, dispatcher.queue.popleft())
    finish_run = store.l3.finish_run

    def finish_then_garble(*args: Any, **kwargs: Any) -> bool:  # the garbage lands during the L3 transaction
        finished = finish_run(*args, **kwargs)
        _garble_fields(store, run_id)
        return finished

    store.l3.finish_run = finish_then_garble  # type: ignore[method-assign]
    finalize = dispatcher.queue.popleft()
    try:
        assert engine.finalize(finalize.message) is True
    finally:
        store.l3.finish_run = finish_run  # type: ignore[method-assign]
    _assert_final_once(store, run_id, routine, expected)
