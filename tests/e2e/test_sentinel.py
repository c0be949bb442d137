"""Redis behind Sentinel: L2 and the broker named by one ``sentinel://`` URL, a failover mid-run.

Three Sentinels watch a master and its replica (all on loopback ports of the test's own); a
300-step run on two worker nodes meets a SIGKILL of the master. The Sentinels promote the replica,
every process finds the new master (L2's client through redis-py's Sentinel, the broker through
kombu's Sentinel transport), and the run ends with every step applied exactly once (replication is
asynchronous, so the failover may lose the last writes: the case of a Redis that went back, which
the watchdog resumes). Run with ``pytest -s`` to see the time from the kill to the run moving again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from state.tiers.redis import connect
from tests.support.records import step_records
from tests.support.sentinel import SentinelSet
from tests.support.waiting import wait_for

PAIRS = 150  # (increment, short sleep) x 150: 300 steps


@pytest.fixture
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    made = SentinelSet(tmp_path_factory.mktemp("sentinel")).start()
    yield made
    made.stop()


def check(cluster) -> dict:
    done = cluster.runctx("check", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def steps_done(client, prefix: str, run_id: str) -> int:
    try:
        return len(step_records(client, prefix, run_id))
    except Exception:  # the master is down, or not yet found again
        return -1


@pytest.mark.slow
def test_a_run_rides_out_a_sentinel_failover_with_every_step_applied_once(sentinels: SentinelSet, make_cluster, tmp_path: Path) -> None:
    steps = []
    for n in range(PAIRS):
        steps += [{"id": f"i{n:03d}", "action": "increment", "args": {"name": "counter"}},
                  {"id": f"z{n:03d}", "action": "sleep", "args": {"seconds": 0.02}}]
    path = tmp_path / "failover.json"
    path.write_text(json.dumps({"name": "failover", "variables": {"counter": 0}, "steps": steps}))
    cluster = make_cluster(redis_url=sentinels.url(0), broker_url=sentinels.url(0), RUNCTX_STALL_TIMEOUT_S="5")
    cluster.start_nodes("n1", "n2", concurrency=2)
    first = check(cluster)["sentinel"]
    assert first == {"master": f"127.0.0.1:{sentinels.ports['master']}", "replicas": [f"127.0.0.1:{sentinels.ports['replica']}"]}

    run_id = cluster.submit(path)
    client = connect(sentinels.url(0), socket_timeout=2)
    try:
        wait_for(lambda: steps_done(client, cluster.prefix, run_id) >= 80, 120, "80 steps")
        killed_port, killed = sentinels.kill_master(), time.time()
        before = max(steps_done(client, cluster.prefix, run_id), 0)
        moved = wait_for(
            lambda: time.time() if steps_done(client, cluster.prefix, run_id) > before else None, 120, "the run to move again", interval_s=0.1
        )
    finally:
        client.close()
    try:
        result = cluster.wait(run_id, timeout_s=180)
    except AssertionError:
        print(cluster.logs()[-15000:])  # what the workers said, for whoever reads a failure
        raise
    assert result["status"] == "succeeded", result
    assert result["variables"]["counter"] == PAIRS
    store = cluster.store()
    try:
        final = store.l3.get_context(run_id)
        epoch = store.ledger.get_run(run_id).epoch
    finally:
        store.close()
    assert sorted(final.applied_steps) == sorted(step["id"] for step in steps)  # each once
    print(f"[Sentinel failover] the run moved again {moved - killed:.1f} s after the master was killed (epoch {epoch})")

    after = check(cluster)["sentinel"]
    assert after["master"] == f"127.0.0.1:{sentinels.ports['replica']}" != f"127.0.0.1:{killed_port}"
