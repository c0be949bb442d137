"""Wait steps, signals and deadlines (`tasks.waiting`), in memory: a run rests at a wait sending
nothing, a signal (early or late) puts its payload in the variable, a deadline ends the wait once,
a fan-out's items each wait for their own event, and what is refused stores nothing."""

from __future__ import annotations

import pytest

from runctx.testing import LocalEnvironment
from state.errors import InvalidValue, LimitExceeded, NotFound, RunEnded, SignalRefused
from state.models import DataSensitivity, ResourceLimits
from tests.support.engine import inc

APPROVAL = {
    "name": "approval",
    "variables": {"counter": 0, "decision": {"sensitivity": "confidential"}},
    "steps": [
        inc("before"),
        {"id": "approve", "wait_for": {"event": "approve", "into": "decision"}},
        inc("after"),
    ],
}


def _waiting(env: LocalEnvironment, run_id: str) -> list[str]:
    return [wait.event for wait in env.store.waits.open([run_id])]


def test_a_run_rests_at_a_wait_and_a_signal_carries_its_payload_into_the_variable() -> None:
    env = LocalEnvironment()
    run_id = env.submit(APPROVAL)
    row = env.settle(run_id)
    assert row.status == "running" and _waiting(env, run_id) == ["approve"]
    assert env.store.get_context(run_id).get("counter") == 1
    sent = len(env.dispatcher.sent)
    assert env.dispatcher.settle(env.engine) == 0  # nothing queued: the run holds no message

    receipt = env.engine.signal(run_id, "approve", {"ok": True, "by": "ann"})
    assert receipt.wait is not None and receipt.wait.step_id == "approve"
    assert env.settle(run_id).status == "succeeded"
    final = env.final(run_id)
    assert final.get("decision") == {"ok": True, "by": "ann"} and final.get("counter") == 2
    assert final.sensitivity_of("decision") is DataSensitivity.CONFIDENTIAL
    assert len(env.dispatcher.sent) > sent and _waiting(env, run_id) == []
    states = {step["id"]: step["state"] for step in env.step_states(run_id)["steps"]}
    assert states == {"before": "done", "approve": "done", "after": "done"}


def test_a_signal_sent_before_the_wait_is_kept_and_consumed_when_the_step_comes() -> None:
    env = LocalEnvironment()
    gate = {**APPROVAL, "steps": [{"id": "hold", "action": "sleep", "args": {"seconds": 0}}, *APPROVAL["steps"]]}
    run_id = env.submit(gate)
    receipt = env.engine.signal(run_id, "approve", "early yes")  # before any step ran
    assert receipt.wait is None
    assert env.settle(run_id).status == "succeeded"
    assert env.final(run_id).get("decision") == "early yes"


def test_a_second_signal_for_an_event_is_refused_and_changes_nothing() -> None:
    env = LocalEnvironment()
    run_id = env.submit({**APPROVAL, "steps": [*APPROVAL["steps"], {"id": "later", "wait_for": {"event": "later", "into": "x"}}]})
    env.settle(run_id)
    env.engine.signal(run_id, "approve", "yes")
    env.settle(run_id)
    assert _waiting(env, run_id) == ["later"]
    with pytest.raises(SignalRefused, match="step 'approve' consumed it"):
        env.engine.signal(run_id, "approve", "no")
    assert env.store.get_context(run_id).get("decision") == "yes"
    env.engine.signal(run_id, "later", 1)
    assert env.settle(run_id).status == "succeeded"


def test_signals_for_unknown_runs_ended_runs_and_unknown_events_are_refused() -> None:
    env = LocalEnvironment(limits=ResourceLimits(max_value_bytes=100))
    run_id = env.submit(APPROVAL)
    env.settle(run_id)
    with pytest.raises(NotFound):
        env.engine.signal("no-such-run", "approve")
    with pytest.raises(InvalidValue, match="waits for no event 'aprove' \\(it waits for: approve\\)"):
        env.engine.signal(run_id, "aprove")
    with pytest.raises(InvalidValue, match="event 'two words'"):
        env.engine.signal(run_id, "two words")
    with pytest.raises(LimitExceeded, match="variable 'decision': max_value_bytes"):
        env.engine.signal(run_id, "approve", "x" * 500)
    assert _waiting(env, run_id) == ["approve"]  # none of them was kept
    env.engine.cancel(run_id)
    assert env.settle(run_id).status == "cancelled"
    with pytest.raises(RunEnded, match="has ended \\(cancelled\\)"):
        env.engine.signal(run_id, "approve", "late")


def _expire(env: LocalEnvironment) -> None:
    """Every open wait's deadline, passed (the twin's clock is the wall clock)."""
    l3 = env.store.l3
    with l3._lock:  # type: ignore[attr-defined]
        for key, wait in list(l3._waits.items()):  # type: ignore[attr-defined]
            if wait.deadline is not None:
                l3._waits[key] = wait.__class__(**{**wait.__dict__, "deadline": 0.0})  # type: ignore[attr-defined]


@pytest.mark.parametrize("on_timeout", ["fail", "continue"])
def test_a_deadline_ends_the_wait_once(on_timeout: str) -> None:
    env = LocalEnvironment()
    routine = {
        **APPROVAL,
        "steps": [
            inc("before"),
            {"id": "approve", "wait_for": {"event": "approve", "into": "decision", "timeout_s": 3600, "on_timeout": on_timeout}},
            inc("after"),
        ],
    }
    run_id = env.submit(routine)
    env.settle(run_id)
    assert env.engine.fire_timeouts() == []  # not yet
    _expire(env)
    assert [w.step_id for w in env.engine.fire_timeouts()] == ["approve"]
    assert env.engine.fire_timeouts() == []  # once
    row = env.settle(run_id)
    if on_timeout == "fail":
        assert row.status == "failed" and "no event 'approve' came within 3600 s" in row.error
        assert env.final(run_id).get("counter") == 1
    else:
        assert row.status == "succeeded"
        final = env.final(run_id)
        assert final.get("decision") is None and "decision" in final.variables and final.get("counter") == 2
    with pytest.raises(RunEnded):
        env.engine.signal(run_id, "approve", "too late")


def test_a_signal_after_the_deadline_fired_is_refused() -> None:
    env = LocalEnvironment()
    routine = {
        "name": "two-waits",
        "steps": [
            {"id": "approve", "wait_for": {"event": "approve", "into": "d", "timeout_s": 60, "on_timeout": "continue"}},
            {"id": "next", "wait_for": {"event": "next", "into": "e"}},
        ],
    }
    run_id = env.submit(routine)
    env.settle(run_id)
    _expire(env)
    env.engine.fire_timeouts()
    env.settle(run_id)
    with pytest.raises(SignalRefused, match="timed out"):
        env.engine.signal(run_id, "approve", "late")


def test_each_item_of_a_fan_out_waits_for_its_own_event() -> None:
    env = LocalEnvironment()
    routine = {
        "name": "per-item",
        "variables": {"docs": ["a", "b", "c"]},
        "steps": [
            {
                "id": "each", "for_each": "docs", "as": "doc", "max_concurrency": 3,
                "steps": [{"id": "approve", "wait_for": {"event": "approve-{doc}", "into": "verdict"}}],
                "collect": {"from": "verdict", "into": "verdicts"},
            }
        ],
    }
    run_id = env.submit(routine)
    env.settle(run_id)
    assert sorted(_waiting(env, run_id)) == ["approve-a", "approve-b", "approve-c"]
    for doc in ("c", "a", "b"):
        env.engine.signal(run_id, f"approve-{doc}", doc.upper())
        env.settle(run_id)
    assert env.settle(run_id).status == "succeeded"
    assert env.final(run_id).get("verdicts") == ["A", "B", "C"]


def test_a_resumed_run_waits_afresh_where_its_wait_had_timed_out() -> None:
    env = LocalEnvironment()
    wait = {"id": "approve", "wait_for": {"event": "approve", "into": "decision", "timeout_s": 60}}
    routine = {**APPROVAL, "steps": [inc("before"), wait, inc("after")]}
    run_id = env.submit(routine)
    env.settle(run_id)
    _expire(env)
    env.engine.fire_timeouts()
    assert env.settle(run_id).status == "failed"
    assert env.engine.resume(run_id) is True
    env.settle(run_id)
    assert _waiting(env, run_id) == ["approve"]
    env.engine.signal(run_id, "approve", "yes")
    assert env.settle(run_id).status == "succeeded"
    assert env.final(run_id).get("counter") == 2  # 'before' once, 'after' once


def test_a_rewound_run_finds_its_wait_as_l3_holds_it() -> None:
    env = LocalEnvironment()
    run_id = env.submit(APPROVAL)
    env.settle(run_id)
    env.store.l2.__init__(prefix="mem", config=env.store.config)  # type: ignore[misc]  # L2 loses everything
    env.store.l1.clear()
    env.engine.signal(run_id, "approve", "after the loss")
    row = env.settle(run_id)
    assert row.status == "succeeded", row.error
    final = env.final(run_id)
    assert final.get("decision") == "after the loss" and final.get("counter") == 2


def test_waits_and_signals_are_counted() -> None:
    from prometheus_client import REGISTRY

    def count(name: str, outcome: str) -> float:
        return REGISTRY.get_sample_value(name, {"routine": "counted", "outcome": outcome}) or 0.0

    before = {key: count(*key) for key in [("runctx_waits_total", o) for o in ("armed", "signalled", "timed_out")]
              + [("runctx_signals_total", o) for o in ("early", "awaited")]}
    env = LocalEnvironment()
    routine = {
        "name": "counted",
        "steps": [
            {"id": "zero", "action": "set", "args": {"name": "z", "value": 0}},  # queued: the run is not waiting yet
            {"id": "one", "wait_for": {"event": "one", "into": "a"}},
            {"id": "two", "wait_for": {"event": "two", "into": "b", "timeout_s": 60, "on_timeout": "continue"}},
        ],
    }
    run_id = env.submit(routine)
    env.engine.signal(run_id, "one", 1)  # before the run came to wait: early
    env.settle(run_id)
    _expire(env)
    env.engine.fire_timeouts()
    assert env.settle(run_id).status == "succeeded"
    after = {key: count(*key) - value for key, value in before.items()}
    assert after == {
        ("runctx_waits_total", "armed"): 1, ("runctx_waits_total", "signalled"): 1, ("runctx_waits_total", "timed_out"): 1,
        ("runctx_signals_total", "early"): 1, ("runctx_signals_total", "awaited"): 0,
    }
