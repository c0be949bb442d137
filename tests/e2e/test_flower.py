"""Flower shows a run's steps under readable names, the failing one as FAILURE, and no context value.

Flower is started as a user would (``celery -A workers flower``, with HTTP basic auth: its API
answers 401 otherwise) against the cluster's broker, before the routine runs, so that it sees
every task event. The routine has more than 100 step tasks: a parallel group of 4 branches of 25
increments, a step that reads a variable with a distinctive value, and a step that fails.

Other tests may run workers on the same broker at the same time, and Celery's events are
broadcast to every listener of the broker: only the tasks of this cluster's nodes are looked at.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.support.flower import start_flower
from tests.support.servers import BROKERS
from tests.support.waiting import wait_for

ROUTINE = "flower-visible"
BRANCHES, STEPS_PER_BRANCH = 4, 25
MARKER = "flower-must-not-show-7f3a"  # a plain variable's value: never in a task message or event
SET_MARKER = "flower-must-not-show-set-9c1e"  # a value a step writes
FAIL_REASON = "the gate is closed on purpose"
INTERNAL_NAMES = {"runctx.step", "runctx.finalize", "runctx.write_behind"}


def _write_routine(path: Path) -> tuple[list[str], str, str]:
    """The routine; returns the ids of the steps that run, the failing step's id, and one that never runs."""
    branches = [
        [{"id": f"b{b}-s{s:02d}", "action": "increment", "args": {"name": "counter", "by": 1}} for s in range(STEPS_PER_BRANCH)]
        for b in range(BRANCHES)
    ]
    routine = {
        "name": ROUTINE,
        "variables": {"counter": 0, "marker": MARKER},
        "steps": [
            {"id": "fan-out", "parallel": branches},
            {"id": "keep-marker", "action": "copy", "args": {"from": "marker", "to": "marker_copy"}},
            {"id": "stamp", "action": "set", "args": {"name": "stamp", "value": SET_MARKER}},
            {"id": "gate", "action": "fail", "args": {"message": FAIL_REASON}},
            {"id": "never", "action": "set", "args": {"name": "reached", "value": True}},
        ],
    }
    path.write_text(json.dumps(routine))
    ran = [step["id"] for branch in branches for step in branch] + ["keep-marker", "stamp", "gate"]
    return ran, "gate", "never"


# ---- the test ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("broker", BROKERS)
def test_flower_shows_every_step_by_name_the_failure_and_no_context_value(make_cluster, tmp_path: Path, broker: str) -> None:
    ran, failing, never = _write_routine(tmp_path / "routine.json")
    cluster = make_cluster(broker)
    cluster.start_nodes("n1", "n2", concurrency=2)
    workers = {cluster.node_name("n1"), cluster.node_name("n2")}

    with start_flower(cluster) as flower:
        flower.wait_for_workers(workers)
        assert flower.get("/api/tasks", auth=False)[0] == 401, "Flower's API must refuse a request without credentials"

        result = cluster.run(tmp_path / "routine.json", timeout_s=180)
        assert result["status"] == "failed", {k: v for k, v in result.items() if k != "steps"}
        assert result["variables"]["counter"] == BRANCHES * STEPS_PER_BRANCH
        run_id = result["run_id"]

        # Flower hears the events a little after the run ends: wait until it saw every step end.
        step_names = {f"{ROUTINE}: {step_id}" for step_id in ran}
        finalize_name = f"{ROUTINE}: finalize (failed)"
        done_states = {"SUCCESS", "FAILURE"}
        expected = step_names | {finalize_name}
        seen: dict[str, set[str]] = {"ended": set()}

        def saw_every_end() -> dict[str, dict]:
            tasks = flower.tasks_of(workers)
            seen["ended"] = {task["name"] for task in tasks.values() if task["state"] in done_states}
            return tasks if expected <= seen["ended"] else {}

        tasks = wait_for(saw_every_end, 60, lambda: f"Flower to see these end: {sorted(expected - seen['ended'])[:10]}", 0.5)
        raw = flower.get("/api/tasks?limit=100000")[1].decode()

        # Every task under a readable name: the routine's step or finalize, or the one write-behind name.
        names = Counter(task["name"] for task in tasks.values())
        assert not INTERNAL_NAMES & set(names), f"internal task names shown: {names}"
        unreadable = {n for n in names if not (n or "").startswith(f"{ROUTINE}: ") and n != "runctx: write-behind"}
        assert not unreadable, f"tasks without a readable name: {unreadable}"
        assert len(tasks) > 100, f"only {len(tasks)} tasks seen"

        # Each step that ran, once; the step after the failure never sent.
        step_tasks = {t["name"]: t for t in tasks.values() if t["name"] in step_names}
        assert set(step_tasks) == step_names
        assert all(names[name] == 1 for name in step_names), {n: c for n, c in names.items() if c > 1}
        assert f"{ROUTINE}: {never}" not in names, "a step after the failing one was sent"

        # The failing step is FAILURE with the reason; every other step SUCCESS.
        gate = step_tasks[f"{ROUTINE}: {failing}"]
        assert gate["state"] == "FAILURE", gate
        assert FAIL_REASON in (gate["exception"] or "") and "StepFailedItsRun" in gate["exception"], gate["exception"]
        others = {name: t["state"] for name, t in step_tasks.items() if t is not gate}
        assert set(others.values()) == {"SUCCESS"}, {n: s for n, s in others.items() if s != "SUCCESS"}
        assert [t["state"] for t in tasks.values() if t["name"] == finalize_name] == ["SUCCESS"]

        # No context value anywhere: not in the task list, nor in a task's own page.
        for value in (MARKER, SET_MARKER):
            assert value not in raw, f"{value!r} shown by /api/tasks"
        for task_uuid, task in tasks.items():
            if task["name"] in {gate["name"], finalize_name, f"{ROUTINE}: keep-marker", f"{ROUTINE}: stamp"}:
                status, body = flower.get(f"/api/task/info/{task_uuid}")
                assert status == 200 and MARKER not in body.decode() and SET_MARKER not in body.decode(), body[:500]

        # Prometheus: a bounded set of task labels (one per step, not per run or context).
        status, metrics = flower.get("/metrics")
        assert status == 200
        ours = [line for line in metrics.decode().splitlines() if line.startswith("flower_events_total{")
                and any(f'worker="{w}"' in line for w in workers)]
        labels = {re.search(r'task="([^"]*)"', line).group(1) for line in ours}
        assert labels, "flower_events_total has no series for this cluster's workers"
        assert not [label for label in labels if run_id in label], "a task label holds the run id"
        assert labels <= step_names | {finalize_name, "runctx: write-behind"}, labels - step_names
        assert MARKER not in metrics.decode() and SET_MARKER not in metrics.decode()


@pytest.mark.slow
def test_flower_shows_a_run_waiting_for_its_event(make_cluster, tmp_path: Path) -> None:
    """The step before a wait ends SUCCESS with the result "waiting for event approve" (the run
    holds no task meanwhile); the signal's step shows up under its own name once sent."""
    (tmp_path / "waits.json").write_text(json.dumps({
        "name": "flower-waits",
        "steps": [
            {"id": "ask", "action": "set", "args": {"name": "asked", "value": True}},
            {"id": "approve", "wait_for": {"event": "approve", "into": "decision"}},
        ],
    }))
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=2)
    workers = {cluster.node_name("n1")}
    with start_flower(cluster) as flower:
        flower.wait_for_workers(workers)
        run_id = cluster.submit(tmp_path / "waits.json")

        def asked() -> dict | None:
            return next((t for t in flower.tasks_of(workers).values() if t["name"] == "flower-waits: ask" and t["state"] == "SUCCESS"), None)

        task = wait_for(asked, 60, "Flower to see the step before the wait end", 0.5)
        assert task["result"] == "'waiting for event approve'", task["result"]
        assert cluster.runctx("signal", run_id, "approve").returncode == 0
        assert cluster.wait(run_id)["status"] == "succeeded"
        wait_for(lambda: any(t["name"] == "flower-waits: approve" and t["state"] == "SUCCESS" for t in flower.tasks_of(workers).values()),
                 60, "Flower to see the signalled step end", 0.5)
