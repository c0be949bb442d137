"""A busy cluster is not a broken one: a backlog many times the stall timeout deep drains with no
run resumed and no step run twice, while a run whose messages the broker lost is still resumed.

Real Redis (a server of the test's own: L2 on database 0, the broker on database 1), PostgreSQL and
two prefork worker nodes of two processes each, with RUNCTX_STALL_TIMEOUT_S=2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.support.records import step_records
from tests.support.waiting import wait_for

STALL_S = 2
RUNS = 300
SUBMIT_MANY = """
import json, sys
from runctx.api import Client
client = Client()
routine = client.load(sys.argv[1])
print(json.dumps([client.submit(routine) for _ in range(int(sys.argv[2]))]))
"""


def routine(path: Path, name: str, pairs: int, nap_s: float) -> Path:
    steps = []
    for n in range(pairs):
        steps.append({"id": f"i{n}", "action": "increment", "args": {"name": "counter"}})
        steps.append({"id": f"z{n}", "action": "sleep", "args": {"seconds": nap_s}})
    path.write_text(json.dumps({"name": name, "variables": {"counter": 0}, "steps": steps}))
    return path


def resumes_logged(cluster) -> int:
    return cluster.logs().count("resuming it from what the tiers hold")


@pytest.mark.slow
def test_a_backlog_deeper_than_the_stall_timeout_drains_with_no_run_resumed(own_redis, cluster_on, tmp_path: Path) -> None:
    cluster = cluster_on(own_redis.url(0), own_redis.url(1), RUNCTX_STALL_TIMEOUT_S=str(STALL_S))
    cluster.start_nodes("n1", "n2", concurrency=2)
    path = routine(tmp_path / "busy.json", "busy", pairs=2, nap_s=0.1)  # 0.2 s of sleep a run: ~15 s for all on 4 processes
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", SUBMIT_MANY, str(path), str(RUNS)], env=cluster.env, cwd=cluster.work_dir,
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    run_ids = json.loads(done.stdout.strip().splitlines()[-1])
    store = cluster.store()
    try:
        def all_done() -> bool:
            return all(row.status != "running" for row in store.ledger.list_runs(limit=RUNS + 10))

        wait_for(all_done, 300, "every run to end", interval_s=0.5)
        drained_s = time.time() - started
        rows = [store.ledger.get_run(run_id) for run_id in run_ids]
        assert {row.status for row in rows} == {"succeeded"}
        assert {row.epoch for row in rows} == {1}, "a run was resumed while its step waited in the queue"
        for run_id in run_ids:
            final = store.l3.get_context(run_id)
            assert final.variables["counter"] == 2 and sorted(final.applied_steps) == ["i0", "i1", "z0", "z1"]
    finally:
        store.close()
    print(f"[backlog] {RUNS} runs drained in {drained_s:.1f} s ({drained_s / STALL_S:.0f}x the stall timeout), resumes: {resumes_logged(cluster)}")
    assert drained_s > 3 * STALL_S, "the backlog was not deeper than the stall timeout: the test proves nothing"
    assert resumes_logged(cluster) == 0
    assert "a backlog, not a stall" in cluster.logs()  # runs did look stalled: they waited that long


@pytest.mark.slow
def test_a_run_whose_messages_the_broker_lost_is_resumed_once_the_queues_are_empty(own_redis, cluster_on, tmp_path: Path) -> None:
    cluster = cluster_on(own_redis.url(0), own_redis.url(1), RUNCTX_STALL_TIMEOUT_S=str(STALL_S))
    cluster.start_nodes("n1", "n2", concurrency=2)
    run_id = cluster.submit(routine(tmp_path / "long.json", "long", pairs=10, nap_s=0.3))
    store = cluster.store()
    try:
        l2 = redis.Redis.from_url(own_redis.url(0))
        wait_for(lambda: "i3" in step_records(l2, cluster.prefix, run_id), 60, "step i3", interval_s=0.1)
        l2.close()
        for short in ("n1", "n2"):
            cluster.kill_node(short)
        broker = redis.Redis.from_url(own_redis.url(1))
        broker.flushdb()  # the broker lost every message: the queued one and those the nodes held
        broker.close()
        cluster.start_nodes("n1", "n2", concurrency=2)
        result = cluster.wait(run_id, timeout_s=120)
        assert result["status"] == "succeeded", result
        assert result["variables"]["counter"] == 10
        assert store.ledger.get_run(run_id).epoch >= 2  # resumed by the watchdog
        assert sorted(store.l3.get_context(run_id).applied_steps) == sorted(f"{kind}{n}" for kind in "iz" for n in range(10))
    finally:
        store.close()
