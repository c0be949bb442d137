"""`runctx submit|run --idempotency-key` on real workers and servers: twenty processes submitting
with one key at once start one run; a repeat is answered with it (exit 0, "existing": true); the
key with other variables is refused in one line and stores nothing; a pruned run frees its key."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SUBMITTERS = 20


def routine_file(tmp_path: Path) -> Path:
    path = tmp_path / "keyed.json"
    steps = [{"id": f"s{i}", "action": "increment", "args": {"name": "counter"}} for i in range(3)]
    path.write_text(json.dumps({"name": "keyed", "variables": {"counter": 0, "who": "ada"}, "steps": steps}))
    return path


def runs_of(cluster) -> list[dict]:
    done = cluster.runctx("runs", "--routine", "keyed", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["runs"]


def test_twenty_concurrent_submits_with_one_key_start_one_run(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    path = routine_file(tmp_path)
    command = [sys.executable, "-m", "runctx.cli", "submit", str(path), "--idempotency-key", "order-42", "--json"]
    submitters = [
        subprocess.Popen(command, env=cluster.env, cwd=cluster.work_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(SUBMITTERS)
    ]
    answers = []
    for process in submitters:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        answers.append(json.loads(out))
    run_ids = {answer["run_id"] for answer in answers}
    assert len(run_ids) == 1, answers
    assert sorted(answer["existing"] for answer in answers) == [False] + [True] * (SUBMITTERS - 1)
    run_id = run_ids.pop()
    result = cluster.wait(run_id)
    assert result["status"] == "succeeded" and result["variables"]["counter"] == 3
    assert [run["run_id"] for run in runs_of(cluster)] == [run_id]

    # `run` with the key: the same run, waited for (its steps do not run again).
    again = cluster.run(path, "--idempotency-key", "order-42")
    assert again["run_id"] == run_id and again["existing"] is True and again["variables"]["counter"] == 3

    # The key with other variables: one line naming the key, exit 1, nothing stored.
    refused = cluster.runctx("submit", str(path), "--idempotency-key", "order-42", "--var", "who=bob")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "idempotency key 'order-42'" in refused.stderr and run_id in refused.stderr and "Traceback" not in refused.stderr
    assert [run["run_id"] for run in runs_of(cluster)] == [run_id]

    # Pruned, the run frees its key: the next submit starts a new run.
    time.sleep(1.1)  # the point: the run must be older than the prune's one second, on the database's clock
    pruned = cluster.runctx("prune", "--older-than", "1s")
    assert pruned.returncode == 0, pruned.stderr
    fresh = cluster.runctx("submit", str(path), "--idempotency-key", "order-42", "--json")
    assert fresh.returncode == 0, fresh.stderr
    answer = json.loads(fresh.stdout)
    assert answer["existing"] is False and answer["run_id"] != run_id
