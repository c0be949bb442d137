"""`runctx runs` and `runctx cancel` on real worker processes: --json shapes and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from tests.support.records import active_steps, control_app, step_records
from tests.support.waiting import wait_for


def _write(path: Path, name: str, steps: list[dict]) -> Path:
    path.write_text(json.dumps({"name": name, "variables": {"counter": 0}, "steps": steps}))
    return path


@pytest.mark.slow
def test_runs_lists_runs_newest_first_and_filters_them(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=1)
    first = cluster.run(_write(tmp_path / "a.json", "alpha", [{"id": "s", "action": "increment", "args": {"name": "counter"}}]))
    second = cluster.run(_write(tmp_path / "b.json", "beta", [{"id": "s", "action": "increment", "args": {"name": "counter"}}]))
    assert first["status"] == second["status"] == "succeeded"

    listed = cluster.runctx("runs", "--json")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)["runs"]
    assert [run["run_id"] for run in runs] == [second["run_id"], first["run_id"]]  # newest first
    assert set(runs[0]) == {"run_id", "routine", "version", "status", "created_at", "finished_at", "steps", "error", "forked_from", "waiting_for"}
    assert (runs[0]["routine"], runs[0]["status"], runs[0]["steps"], runs[0]["error"]) == ("beta", "succeeded", 1, None)

    only_alpha = json.loads(cluster.runctx("runs", "--routine", "alpha", "--json").stdout)["runs"]
    assert [run["run_id"] for run in only_alpha] == [first["run_id"]]
    assert len(json.loads(cluster.runctx("runs", "--status", "succeeded", "--limit", "1", "--json").stdout)["runs"]) == 1
    assert json.loads(cluster.runctx("runs", "--status", "cancelled", "--json").stdout)["runs"] == []

    bad = cluster.runctx("runs", "--status", "sideways")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "'sideways'" in bad.stderr and "--status" in bad.stderr


@pytest.mark.slow
def test_cancel_stops_a_running_run_and_says_what_happened(make_cluster, tmp_path: Path) -> None:
    steps = [{"id": f"s{n:02d}", "action": "sleep", "args": {"seconds": 0.1}} for n in range(40)]
    path = _write(tmp_path / "slow.json", "slow", steps)
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=1)
    client = redis.Redis.from_url(cluster.redis_url)
    app = control_app(cluster)
    try:
        run_id = cluster.submit(path)
        wait_for(lambda: len(step_records(client, cluster.prefix, run_id)) >= 3, 60, "three steps done")

        done = cluster.runctx("cancel", run_id, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"run_id": run_id, "cancelled": True, "status": "cancelled"}
        at_cancel = len(step_records(client, cluster.prefix, run_id))

        result = cluster.wait(run_id, timeout_s=60)
        assert result["status"] == "cancelled" and result["error"] == "cancelled by request"
        # A step that was running when the run was cancelled commits nothing: once none runs, count.
        wait_for(lambda: not active_steps(app, cluster, run_id), 30, "no step of the cancelled run running", 0.1)
        assert len(step_records(client, cluster.prefix, run_id)) <= at_cancel + 1 < len(steps)

        again = cluster.runctx("cancel", run_id)
        assert again.returncode == 3 and "had ended (cancelled)" in again.stderr
        unknown = cluster.runctx("cancel", "no-such-run")
        assert unknown.returncode == 1 and unknown.stderr.strip() == "runctx: run 'no-such-run' does not exist"
    finally:
        client.close()
        app.close()


@pytest.mark.slow
def test_status_shows_each_step_and_the_totals_of_a_running_and_a_finished_run(make_cluster, tmp_path: Path) -> None:
    steps = [{"id": f"s{n:02d}", "action": "sleep", "args": {"seconds": 0.3}} for n in range(12)]
    path = _write(tmp_path / "status.json", "status-demo", steps)
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=1)
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        run_id = cluster.submit(path)
        wait_for(lambda: len(step_records(client, cluster.prefix, run_id)) >= 2, 60, "two steps done")
        shown = cluster.runctx("status", run_id, "--json")
        assert shown.returncode == 0, shown.stderr
        states = json.loads(shown.stdout)
        assert states["status"] == "running" and states["routine"] == "status-demo"
        assert [step["id"] for step in states["steps"]] == [step["id"] for step in steps]
        totals = states["totals"]
        assert totals["total"] == 12 and totals["done"] >= 2 and totals["running"] <= 1 and totals["failed"] == 0
        assert totals["done"] + totals["running"] + totals["pending"] == 12
        done = [step for step in states["steps"] if step["state"] == "done"]
        assert all(step["worker"].startswith("n1-") and step["attempts"] == 1 and step["duration_s"] > 0.1 for step in done)

        watched = cluster.runctx("status", run_id, "--watch", timeout_s=60)  # returns when the run ends
        assert watched.returncode == 0 and "done 12 / running 0 / pending 0 / failed 0 (of 12)" in watched.stdout
        final = json.loads(cluster.runctx("status", run_id, "--json").stdout)
        assert final["status"] == "succeeded" and final["totals"]["done"] == 12

        unknown = cluster.runctx("status", "no-such-run")
        assert unknown.returncode == 1 and unknown.stderr.strip() == "runctx: run 'no-such-run' does not exist"
    finally:
        client.close()


@pytest.mark.slow
def test_context_shows_the_tree_of_a_run_with_sensitive_values_masked(make_cluster, tmp_path: Path) -> None:
    routine = {
        "name": "tree-demo",
        "variables": {"counter": 0, "token": {"sensitivity": "secret"}},
        "steps": [
            {"id": "s1", "action": "increment", "args": {"name": "counter"}},
            {"id": "sub", "routine": {"name": "kid", "steps": [{"id": "k1", "action": "increment", "args": {"name": "counter"}}]},
             "inherit": ["counter", "token"]},
        ],
    }
    path = tmp_path / "tree.json"
    path.write_text(json.dumps(routine))
    (tmp_path / "vars.json").write_text('{"token": "tree-secret-123"}')
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=1)
    result = cluster.run(path, "--var-file", str(tmp_path / "vars.json"))
    assert result["status"] == "succeeded", result

    shown = cluster.runctx("context", result["run_id"], "--json")
    assert shown.returncode == 0, shown.stderr
    tree = json.loads(shown.stdout)
    assert [ctx["path"] for ctx in tree["contexts"]] == ["", "sub"]
    root, child = tree["contexts"]
    assert root["variables"] == {"counter": 2, "token": "***"} and child["variables"]["token"] == "***"
    assert child["parent"] == result["run_id"] and root["version_l3"] >= 2
    human = cluster.runctx("context", result["run_id"])
    assert human.returncode == 0 and "(root)" in human.stdout and "tree-secret-123" not in shown.stdout + human.stdout
    assert cluster.runctx("context", "no-such-run").stderr.strip() == "runctx: run 'no-such-run' does not exist"
