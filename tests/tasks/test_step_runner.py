"""The step runner's choices that are not a step's own: a process that cannot run a step another
can hands its message back."""

from __future__ import annotations

import pytest

from runctx.testing import LocalEnvironment
from state.errors import KeyNotHeld
from tasks.steps import StepExecutor


@pytest.fixture
def env() -> LocalEnvironment:
    return LocalEnvironment()


def test_a_process_that_lacks_a_key_hands_the_step_back_instead_of_failing_the_run(env: LocalEnvironment, monkeypatch) -> None:
    real_run, calls = StepExecutor.run, []

    def lacking_once(self, message, node, *args, **kwargs):  # the first process to take b started before a rotation
        if message.routine != "rotating":  # another test's engine, still running in this process
            return real_run(self, message, node, *args, **kwargs)
        calls.append(message.step_id)
        if message.step_id == "b" and calls.count("b") == 1:
            raise KeyNotHeld("context x", "k2")
        return real_run(self, message, node, *args, **kwargs)

    monkeypatch.setattr(StepExecutor, "run", lacking_once)
    routine = {"name": "rotating", "steps": [{"id": "a", "action": "set", "args": {"name": "x", "value": 1}},
                                             {"id": "b", "action": "increment", "args": {"name": "x"}}]}
    run_id, row = env.run(routine)
    assert row.status == "succeeded" and env.final(run_id).variables["x"] == 2
    assert calls.count("b") == 2  # handed back once, then run
