"""Many branches incrementing one counter on real worker processes: no update lost, none doubled."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.support.servers import BROKERS

BRANCHES = 20
STEPS_PER_BRANCH = 50


def _write_routine(path: Path) -> list[str]:
    """A parallel group of BRANCHES branches, each STEPS_PER_BRANCH increments of one counter."""
    branches = [
        [{"id": f"b{b:02d}-s{s:02d}", "action": "increment", "args": {"name": "counter", "by": 1}} for s in range(STEPS_PER_BRANCH)]
        for b in range(BRANCHES)
    ]
    routine = {
        "name": "parallel-1000",
        "variables": {"counter": 0},
        "steps": [
            {"id": "fan-out", "parallel": branches},
            {"id": "after", "action": "copy", "args": {"from": "counter", "to": "final_count"}},
        ],
    }
    path.write_text(json.dumps(routine))
    return [step["id"] for branch in branches for step in branch] + ["after"]


@pytest.mark.slow
@pytest.mark.parametrize("broker", BROKERS)
def test_twenty_branches_of_fifty_increments_count_exactly_1000(make_cluster, tmp_path: Path, broker: str) -> None:
    step_ids = _write_routine(tmp_path / "parallel.json")
    cluster = make_cluster(broker)
    cluster.start_nodes("n1", "n2", concurrency=2)

    result = cluster.run(tmp_path / "parallel.json", timeout_s=180)

    assert result["status"] == "succeeded", {k: v for k, v in result.items() if k != "steps"}
    total = BRANCHES * STEPS_PER_BRANCH
    assert result["variables"]["counter"] == total
    assert result["variables"]["final_count"] == total

    # Every step reported once, succeeded, attempted at least once (a redelivery may run it again).
    reported = Counter(step["id"] for step in result["steps"])
    assert set(reported) == set(step_ids) and set(reported.values()) == {1}
    assert all(step["status"] == "succeeded" and step["attempts"] >= 1 for step in result["steps"])
    assert {step["worker"].split("-")[0] for step in result["steps"]} == {"n1", "n2"}

    # ... and applied once: L3's final context holds each step once, one version per applied step.
    store = cluster.store()
    try:
        final = store.l3.get_context(result["run_id"])
        assert final.variables["counter"] == total and final.variables["final_count"] == total
        applied = Counter(final.applied_steps)
        assert set(applied) == set(step_ids) and set(applied.values()) == {1}
        assert final.version == 1 + len(step_ids)
        assert store.l2.pending_flushes() == 0
    finally:
        store.close()


@pytest.mark.slow
def test_the_1000_increments_count_exactly_with_l2_on_a_redis_cluster(
    make_cluster, redis_cluster, servers, tmp_path: Path
) -> None:
    """L2 on a local 3-primary Redis Cluster (RUNCTX_REDIS_URL names one node; runctx finds out it
    is a cluster), the broker a plain Redis: the counter is exact and the run's keys are spread
    over more than one shard."""
    from runctx.embedded import celery_broker_url

    step_ids = _write_routine(tmp_path / "parallel.json")
    cluster = make_cluster("redis", redis_url=redis_cluster.url)
    cluster.broker_url = celery_broker_url(servers.redis_url)
    cluster.start_nodes("n1", "n2", concurrency=2)

    result = cluster.run(tmp_path / "parallel.json", timeout_s=180)

    assert result["status"] == "succeeded", {k: v for k, v in result.items() if k != "steps"}
    total = BRANCHES * STEPS_PER_BRANCH
    assert result["variables"]["counter"] == total and result["variables"]["final_count"] == total
    assert sorted(step["id"] for step in result["steps"]) == sorted(step_ids)

    run_id = result["run_id"]
    per_node = redis_cluster.keys_per_node(f"{cluster.prefix}:*{run_id}*")
    holding = {port: keys for port, keys in per_node.items() if keys}
    assert len(holding) > 1, per_node
    store = cluster.store()
    try:
        final = store.l3.get_context(run_id)
        assert final.variables["counter"] == total
        assert Counter(final.applied_steps) == Counter(step_ids)
    finally:
        store.close()
