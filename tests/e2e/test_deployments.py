"""Two deployments sharing one PostgreSQL database (staging and production), each with its key
prefix, its queues and its worker node: production's watchdog resumes its own stalled run and
leaves staging's alone, whose first step only waits for a staging worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from state.sealing import Keyring
from tests.support.cluster import Cluster, new_prefix

FAST = {"RUNCTX_STALL_TIMEOUT_S": "1"}


def routine(path: Path) -> Path:
    steps = [{"id": f"s{n}", "action": "increment", "args": {"name": "n"}} for n in range(3)]
    path.write_text(json.dumps({"name": "shared-db", "variables": {"n": 0}, "steps": steps}))
    return path


@pytest.mark.slow
def test_a_deployments_watchdog_leaves_another_deployments_stalled_run_alone(make_cluster, tmp_path_factory, tmp_path: Path) -> None:
    keys = {"RUNCTX_ENCRYPTION_KEYS": Keyring.new_entry()}  # (sealed values in one database: one set of keys)
    staging = make_cluster("redis", **FAST, **keys)
    production = Cluster(
        redis_url=staging.redis_url, database_url=staging.database_url, broker_url=staging.broker_url,
        prefix=new_prefix(), work_dir=tmp_path_factory.mktemp("cluster"), extra_env={**FAST, **keys},
    )
    path = routine(tmp_path / "shared.json")
    broker = redis.Redis.from_url(staging.broker_url)
    try:
        waiting = staging.submit(path)  # no staging worker yet: it waits in staging's queue
        lost = production.submit(path)
        broker.delete(f"{production.prefix}.steps")  # production's broker lost its first step
        production.start_nodes("p1", concurrency=1)
        result = production.wait(lost, timeout_s=60)  # its watchdog found it and resumed it
        assert result["status"] == "succeeded" and result["variables"]["n"] == 3
        assert production.runctx("status", waiting).returncode != 0  # not its run: unknown to it
        listed = json.loads(production.runctx("runs", "--json").stdout)
        assert [run["run_id"] for run in listed["runs"]] == [lost]

        store = staging.store()
        try:
            row = store.ledger.get_run(waiting)
            assert row.status == "running" and row.epoch == 1  # production's watchdog left it alone
        finally:
            store.close()
        staging.start_nodes("s1", concurrency=1)
        result = staging.wait(waiting, timeout_s=60)
        assert result["status"] == "succeeded" and result["variables"]["n"] == 3
    finally:
        production.stop()
        keys_left = list(broker.scan_iter(match=f"{production.prefix}*", count=1000))
        if keys_left:
            broker.delete(*keys_left)
        broker.close()
