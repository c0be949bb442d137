"""Submitting with an idempotency key (`tasks.submission`), in memory: the second submit of the same
routine and variables is answered with the first run; another routine or other variables under
the key are refused with one line, and nothing is stored for them."""

from __future__ import annotations

import pytest

from runctx.testing import LocalEnvironment
from state.errors import InvalidValue
from tasks.routine import parse_routine
from tests.support.engine import sequence


def runs(env: LocalEnvironment) -> list[str]:
    return sorted(row.run_id for row in env.store.ledger.list_runs(limit=1000))


def test_a_second_submit_with_the_key_gets_the_first_run_and_starts_nothing() -> None:
    env = LocalEnvironment()
    routine = parse_routine(sequence(3))
    first = env.engine.submit_request(routine, variables={"who": "ada"}, idempotency_key="order-42")
    second = env.engine.submit_request(routine, variables={"who": "ada"}, idempotency_key="order-42")
    assert (first.existing, second.existing) == (False, True) and first.run_id == second.run_id
    assert env.settle(first.run_id).status == "succeeded"
    assert env.store.get_context(first.run_id).get("counter") == 3  # its steps ran once
    assert runs(env) == [first.run_id]
    # A finished run still holds its key (until it is pruned).
    assert env.engine.submit_request(routine, variables={"who": "ada"}, idempotency_key="order-42").run_id == first.run_id


@pytest.mark.parametrize("other", ["variables", "routine"])
def test_the_key_with_another_routine_or_other_variables_is_refused_and_stores_nothing(other: str) -> None:
    env = LocalEnvironment()
    routine = parse_routine(sequence(3))
    run_id = env.engine.submit(routine, variables={"who": "ada"}, idempotency_key="order-42")
    versions = env.store.configs.get_routine(routine.name).version
    changed = parse_routine(sequence(4)) if other == "routine" else routine
    with pytest.raises(InvalidValue) as refused:
        env.engine.submit(changed, variables={"who": "bob" if other == "variables" else "ada"}, idempotency_key="order-42")
    assert str(refused.value) == f"idempotency key 'order-42': run {run_id} was submitted with it for another routine or other variables"
    assert runs(env) == [run_id] and env.store.configs.get_routine(routine.name).version == versions


@pytest.mark.parametrize("key", ["", "   ", "x" * 201, "tab\there"])
def test_a_malformed_key_is_refused_in_one_line(key: str) -> None:
    env = LocalEnvironment()
    with pytest.raises(InvalidValue, match="idempotency key: 1 to 200 printable characters"):
        env.engine.submit(parse_routine(sequence(1)), idempotency_key=key)
    assert runs(env) == []
