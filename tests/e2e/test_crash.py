"""Crashes on real worker processes: a run survives them and every step is applied exactly once.

- a node SIGKILLed while it runs one of the run's steps: the step's message comes back (Redis:
  after the visibility timeout; RabbitMQ: at once), the other node finishes the run, and the
  final context equals the one of the same routine run without a kill;
- every node SIGKILLed after a step committed in L2 but before the debounced write to L3: a new
  node finishes the pending write-behind and the run;
- a pool child (not the node) SIGKILLed while it runs a sleep step: the step runs again and
  applies once.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from tests.support.records import active_steps, control_app, step_records, wait_no_pending_flush
from tests.support.servers import BROKERS
from tests.support.waiting import wait_for

CRASH_ENV = {"RUNCTX_VISIBILITY_TIMEOUT_S": "10"}


# ---- routines ------------------------------------------------------------------------------------


def sequence_routine(name: str, kinds: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A sequence of steps s01, s02, ... of the given kinds ("inc", "app" or a float: sleep seconds).

    Returns the routine and the variables it must end with (each step applied exactly once).
    """
    steps: list[dict[str, Any]] = []
    counter, log = 0, []
    for number, kind in enumerate(kinds, start=1):
        step_id = f"s{number:02d}"
        if kind == "inc":
            steps.append({"id": step_id, "action": "increment", "args": {"name": "counter", "by": number}})
            counter += number
        elif kind == "app":
            steps.append({"id": step_id, "action": "append", "args": {"name": "log", "value": step_id}})
            log.append(step_id)
        else:
            steps.append({"id": step_id, "action": "sleep", "args": {"seconds": float(kind)}})
    steps.append({"id": "total", "action": "copy", "args": {"from": "counter", "to": "total"}})
    routine = {"name": name, "variables": {"counter": 0, "log": []}, "steps": steps}
    return routine, {"counter": counter, "log": log, "total": counter}


def write(path: Path, routine: dict[str, Any]) -> Path:
    path.write_text(json.dumps(routine))
    return path


# ---- checking a run -----------------------------------------------------------------------------------


def assert_applied_once(store, run_id: str, routine: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """L3's final context holds each step once (one version per step) and the expected variables."""
    final = store.l3.get_context(run_id)
    step_ids = [step["id"] for step in routine["steps"]]
    applied = Counter(final.applied_steps)
    assert set(applied) == set(step_ids) and set(applied.values()) == {1}, applied
    assert final.version == 1 + len(step_ids)
    assert final.variables == expected
    return final.variables


def _run_status(store, run_id: str) -> str:
    run = store.ledger.get_run(run_id)
    return None if run is None else run.status


# ---- a. a node killed in the middle of a run ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("broker", BROKERS)
def test_node_killed_mid_run_the_run_completes_as_without_a_kill(make_cluster, tmp_path: Path, broker: str) -> None:
    # ~30 short steps; s12 sleeps long enough to be caught running on whichever node took it, even
    # when a loaded machine makes two inspect rounds in a row wait out their 1 s timeout.
    kinds: list[Any] = ["inc", "app", 0.1] * 10
    kinds[11] = 5.0
    routine, expected = sequence_routine("crash-mid-run", kinds)
    path = write(tmp_path / "mid-run.json", routine)
    cluster = make_cluster(broker, **CRASH_ENV)
    cluster.start_nodes("n1", "n2", concurrency=2)
    client = redis.Redis.from_url(cluster.redis_url)
    app = control_app(cluster)
    store = cluster.store()
    try:
        # The same routine without a kill: what the crashed run must end with.
        reference = cluster.run(path)
        assert reference["status"] == "succeeded", reference
        reference_variables = assert_applied_once(store, reference["run_id"], routine, expected)

        run_id = cluster.submit(path)
        # Eleven steps in, kill the node that runs s12 (and so holds its message) while it runs it.
        wait_for(lambda: "s11" in step_records(client, cluster.prefix, run_id), 60, "s11 to succeed")

        def running_s12() -> dict[str, Any] | None:
            running = [step for step in active_steps(app, cluster, run_id) if step["step_id"] == "s12"]
            return running[0] if running else None

        victim = wait_for(running_s12, 30, "s12 to be running", interval_s=0.05)
        cluster.kill_node(victim["short"])
        in_flight = "s12" not in step_records(client, cluster.prefix, run_id)
        done_before_kill = len(step_records(client, cluster.prefix, run_id))
        survivor = "n2" if victim["short"] == "n1" else "n1"
        assert cluster.nodes[survivor].poll() is None

        result = cluster.wait(run_id, timeout_s=120)
        assert result["status"] == "succeeded", result
        assert result["variables"] == reference["variables"]
        steps = {step["id"]: step for step in result["steps"]}
        assert set(steps) == {step["id"] for step in routine["steps"]}
        assert all(step["status"] == "succeeded" for step in steps.values())
        # The step the dead node was running came back and ran again on the survivor.
        assert in_flight and done_before_kill >= 11, "the kill did not land while s12 ran"
        assert steps[victim["step_id"]]["attempts"] >= 2, steps[victim["step_id"]]
        assert steps[victim["step_id"]]["worker"].startswith(f"{survivor}-")

        # Applied once: L3's final context equals the run without a kill.
        assert assert_applied_once(store, run_id, routine, expected) == reference_variables
        wait_no_pending_flush(store)
    finally:
        app.close()
        client.close()
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize("broker", BROKERS)
def test_node_killed_mid_inline_chain_reruns_only_the_running_step(make_cluster, tmp_path: Path, broker: str) -> None:
    """An inline routine: the whole sequence runs in one task. SIGKILL its node while s20 sleeps: the
    message comes back, the survivor walks the chain again, skips s01-s19 (applied, not run again),
    runs s20 again and goes on; every step is applied exactly once."""
    kinds: list[Any] = ["inc", "app"] * 15
    kinds[19] = 2.0
    routine, expected = sequence_routine("crash-inline", kinds)
    routine.update(inline=True, inline_budget_s=60)
    path = write(tmp_path / "inline.json", routine)
    cluster = make_cluster(broker, **CRASH_ENV)
    cluster.start_nodes("n1", "n2", concurrency=2)
    client = redis.Redis.from_url(cluster.redis_url)
    app = control_app(cluster)
    store = cluster.store()
    try:
        run_id = cluster.submit(path)
        wait_for(lambda: "s19" in step_records(client, cluster.prefix, run_id), 60, "s19 to succeed", 0.005)
        running = wait_for(lambda: active_steps(app, cluster, run_id), 30, "the chain's task to be running", 0.05)
        victim = running[0]["short"]
        cluster.kill_node(victim)
        before = step_records(client, cluster.prefix, run_id)
        assert "s20" not in before and "s19" in before, sorted(before)
        assert {record["worker"].split("-")[0] for record in before.values()} == {victim}  # one task ran them all
        survivor = "n2" if victim == "n1" else "n1"

        result = cluster.wait(run_id, timeout_s=120)
        assert result["status"] == "succeeded", result
        steps = {step["id"]: step for step in result["steps"]}
        assert set(steps) == {step["id"] for step in routine["steps"]}
        for step_id, record in before.items():  # not run again: the records are the first run's
            assert steps[step_id]["finished_at"] == record["finished_at"], step_id
            assert steps[step_id]["attempts"] == 1
        assert steps["s20"]["attempts"] == 2 and steps["s20"]["worker"].startswith(f"{survivor}-")
        assert assert_applied_once(store, run_id, routine, expected) == expected
        wait_no_pending_flush(store)
    finally:
        app.close()
        client.close()
        store.close()


# ---- b. every node killed between the L2 commit and the L3 write ----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("broker", BROKERS)
def test_all_nodes_killed_before_the_l3_flush_a_new_node_finishes_it(make_cluster, tmp_path: Path, broker: str) -> None:
    k = 5  # step s05 is followed by a long sleep: the kill lands while its change is only in Redis
    routine, expected = sequence_routine("crash-before-flush", ["inc", "app", "inc", "app", "inc", 5.0, "app", "inc", "app", "inc"])
    path = write(tmp_path / "before-flush.json", routine)
    cluster = make_cluster(
        broker, **CRASH_ENV, RUNCTX_WRITE_BEHIND_DEBOUNCE_S="5", RUNCTX_WRITE_BEHIND_MAX_DELAY_S="8"
    )
    cluster.start_nodes("n1", "n2", concurrency=2)
    client = redis.Redis.from_url(cluster.redis_url)
    store = cluster.store()
    try:
        run_id = cluster.submit(path)
        wait_for(lambda: f"s{k:02d}" in step_records(client, cluster.prefix, run_id), 60, f"s{k:02d} to succeed", 0.005)

        # The change of s01..s05 is in Redis only: L3 holds an older version.
        in_l2 = store.l2.get_context(run_id)
        in_l3 = store.l3.get_context(run_id)
        assert in_l2 is not None and in_l2.dirty
        assert in_l2.version >= 1 + k and f"s{k:02d}" in in_l2.context.applied_steps
        assert in_l3 is not None and in_l3.version < in_l2.version and f"s{k:02d}" not in in_l3.applied_steps
        assert store.l2.due_time(run_id) is not None

        cluster.kill_node("n1")
        cluster.kill_node("n2")
        assert store.l3.context_version(run_id) == in_l3.version, "L3 changed after s05 though no node flushed"

        cluster.start_node("n3", concurrency=2)
        cluster.wait_ready("n3")
        # The only process alive is the new node: it finishes the write-behind the dead ones scheduled.
        wait_for(lambda: (store.l3.context_version(run_id) or 0) >= in_l2.version, 30, "L3 to catch up with L2")
        caught_up = store.l3.get_context(run_id)
        assert f"s{k:02d}" in caught_up.applied_steps
        # ... while the run is still in flight: the write-behind did it, not the run's finalize.
        assert _run_status(store, run_id) == "running"

        result = cluster.wait(run_id, timeout_s=120)
        assert result["status"] == "succeeded", result
        assert all(step["status"] == "succeeded" for step in result["steps"])
        killed_variables = assert_applied_once(store, run_id, routine, expected)

        reference = cluster.run(path)
        assert reference["status"] == "succeeded", reference
        assert assert_applied_once(store, reference["run_id"], routine, expected) == killed_variables
        assert result["variables"] == reference["variables"]
        wait_no_pending_flush(store)
    finally:
        client.close()
        store.close()


# ---- c. a pool child killed while it runs a step --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("broker", BROKERS)
def test_pool_child_killed_during_a_sleep_step_reruns_it_once(make_cluster, tmp_path: Path, broker: str) -> None:
    routine, expected = sequence_routine("crash-child", ["inc", "app", 2.0, "inc", "app"])
    path = write(tmp_path / "child.json", routine)
    cluster = make_cluster(broker, **CRASH_ENV)
    cluster.start_nodes("n1", "n2", concurrency=2)
    client = redis.Redis.from_url(cluster.redis_url)
    app = control_app(cluster)
    store = cluster.store()
    try:
        run_id = cluster.submit(path)

        def running_nap() -> dict[str, Any] | None:
            running = [step for step in active_steps(app, cluster, run_id) if step["step_id"] == "s03" and step["pid"]]
            return running[0] if running else None

        victim = wait_for(running_nap, 30, "the sleep step to be running", interval_s=0.05)
        node = cluster.nodes[victim["short"]]
        assert victim["pid"] in cluster.pool_pids(victim["short"]) and victim["pid"] != node.pid
        os.kill(victim["pid"], signal.SIGKILL)
        try:
            psutil.Process(victim["pid"]).wait(10)
        except psutil.NoSuchProcess:
            pass
        assert "s03" not in step_records(client, cluster.prefix, run_id)

        result = cluster.wait(run_id, timeout_s=120)
        assert result["status"] == "succeeded", result
        steps = {step["id"]: step for step in result["steps"]}
        assert steps["s03"]["status"] == "succeeded" and steps["s03"]["attempts"] >= 2, steps["s03"]
        assert all(step["attempts"] == 1 for step_id, step in steps.items() if step_id != "s03"), steps
        assert result["variables"] == expected
        assert_applied_once(store, run_id, routine, expected)
        # Only the child died: its node is alive and replaced it.
        assert node.poll() is None
        wait_for(lambda: len(cluster.pool_pids(victim["short"])) == 2, 10, "a new pool process")
        assert victim["pid"] not in cluster.pool_pids(victim["short"])
    finally:
        app.close()
        client.close()
        store.close()
