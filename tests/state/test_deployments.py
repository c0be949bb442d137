"""Deployments sharing one PostgreSQL database (staging and production, two teams): each sees only
its own runs. Two stores with different key prefixes on one database: the runs list, the watchdog,
prune and idempotency keys of one leave the other's runs alone."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from runctx.testing import LocalEnvironment
from state.errors import InvalidValue
from state.models import StateCacheConfig
from state.sealing import Keyring
from state.store import TieredStore
from tasks.routine import parse_routine
from tasks.watchdog import Watchdog

ROUTINE = {"name": "shared-db", "steps": [{"id": f"s{n}", "action": "increment", "args": {"name": "n"}} for n in range(3)]}


@pytest.fixture
def deployments(servers, database_url: str, key_prefix: str) -> Iterator[tuple[LocalEnvironment, LocalEnvironment]]:
    keyring = Keyring.parse(Keyring.new_entry())
    stores = [
        TieredStore.connect(servers.redis_url, database_url, config=StateCacheConfig(), prefix=f"{key_prefix}-{name}", keyring=keyring)
        for name in ("staging", "production")
    ]
    yield LocalEnvironment(store=stores[0]), LocalEnvironment(store=stores[1])
    for store in stores:
        store.close()


def test_each_deployment_lists_and_resumes_only_its_own_runs(deployments) -> None:
    staging, production = deployments
    finished, _ = staging.run(ROUTINE, {"n": 0})
    stalled = staging.submit(ROUTINE, {"n": 0})  # its first step's message is never delivered
    staging.dispatcher.queue.clear()
    mine, _ = production.run(ROUTINE, {"n": 10})

    assert [row.run_id for row in production.store.ledger.list_runs()] == [mine]
    assert {row.run_id for row in staging.store.ledger.list_runs()} == {finished, stalled}
    assert production.store.ledger.get_run(stalled) is None

    later = lambda: time.time() + 3600  # noqa: E731 (an hour on: every running run looks stalled)
    assert Watchdog(production.engine, stall_timeout_s=60, clock=later).scan() == []
    assert staging.store.ledger.get_run(stalled).epoch == 1  # production's watchdog did not touch it
    assert Watchdog(staging.engine, stall_timeout_s=60, clock=later).scan() == [stalled]
    assert staging.settle(stalled).status == "succeeded"


def test_prune_and_idempotency_keys_stay_within_a_deployment(deployments) -> None:
    staging, production = deployments
    routine = parse_routine(ROUTINE)
    first = staging.engine.submit(routine, variables={"n": 0}, idempotency_key="nightly-2026-12-06")
    other = production.engine.submit(routine, variables={"n": 0}, idempotency_key="nightly-2026-12-06")
    assert first != other  # the same key in another deployment is another run
    with pytest.raises(InvalidValue, match="nightly-2026-12-06"):  # the key with other variables, in its own deployment
        staging.engine.submit(routine, variables={"n": 5}, idempotency_key="nightly-2026-12-06")
    staging.settle(first)
    production.settle(other)

    assert production.store.maintenance.prune(0.0).runs == 1
    assert staging.store.ledger.get_run(first).status == "succeeded"  # production's prune left it
    assert production.store.ledger.get_run(other) is None
