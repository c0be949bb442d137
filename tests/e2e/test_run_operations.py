"""`runctx resume` and `runctx fork` on real workers: a run failed by a step that reads a variable
goes on from where it stopped with the variable corrected, every earlier step applied exactly once;
a fork of a 10-step counter at step 6 starts from the counter before step 6; what cannot be done is
one line and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.actions import ME

pytestmark = pytest.mark.slow


def test_resume_a_failed_run_with_a_corrected_variable(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    inc = lambda step_id: {"id": step_id, "action": "increment", "args": {"name": "counter"}}  # noqa: E731
    path = tmp_path / "resumable.json"
    path.write_text(json.dumps({
        "name": "resumable", "variables": {"counter": 0, "total": 12, "divisor": 0},
        "steps": [inc("a"), inc("b"), {"id": "div", "action": f"{ME}:divide"}, inc("c")],
    }))
    failed = cluster.run(path)
    run_id = failed["run_id"]
    assert failed["status"] == "failed" and "divisor is 0" in failed["error"], failed
    assert failed["variables"]["counter"] == 2

    done = cluster.runctx("resume", run_id, "--var", "divisor=4", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"run_id": run_id, "resumed": True, "status": "running"}
    result = cluster.wait(run_id)
    assert result["status"] == "succeeded", result
    # a and b ran once (not again), div ran with the corrected divisor, c once.
    assert (result["variables"]["counter"], result["variables"]["quotient"], result["variables"]["divisor"]) == (3, 3.0, 4)
    history = json.loads(cluster.runctx("history", run_id, "--json").stdout)["entries"]
    commits = [e["step_id"] for e in history if e["kind"] == "step"]
    assert sorted(commits) == ["a", "b", "c", "div"], commits  # each step committed once in all
    events = [e["status"] for e in history if e["kind"] == "event"]
    assert events.index("failed") < events.index("resumed") < events.index("succeeded"), events

    # Succeeded, running, unknown: one line each, nothing changed.
    again = cluster.runctx("resume", run_id, "--var", "divisor=1")
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1 and "succeeded" in again.stderr
    assert cluster.wait(run_id)["variables"]["divisor"] == 4
    unknown = cluster.runctx("resume", "no-such-run")
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr and "Traceback" not in unknown.stderr
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps({"name": "slow", "steps": [{"id": "nap", "action": "sleep", "args": {"seconds": 5}}]}))
    running = cluster.submit(slow)
    busy = cluster.runctx("resume", running)
    assert busy.returncode == 3 and "is running: nothing to resume" in busy.stderr


def test_fork_of_a_ten_step_counter_at_step_6(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    path = tmp_path / "ten.json"
    steps = [{"id": f"s{i}", "action": "increment", "args": {"name": "counter", "by": i}} for i in range(1, 11)]
    path.write_text(json.dumps({"name": "ten", "variables": {"counter": 100}, "steps": steps}))
    origin = cluster.run(path)
    assert origin["status"] == "succeeded" and origin["variables"]["counter"] == 100 + 55

    done = cluster.runctx("fork", origin["run_id"], "--from", "s6", "--var", "note=forked", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["forked_from"] == origin["run_id"] and answer["from_step"] == "s6" and answer["run_id"] != origin["run_id"]
    forked = cluster.wait(answer["run_id"])
    assert forked["status"] == "succeeded", forked
    # What the origin had before s6 (100 + 1..5), plus s6..s10; the variable given is there.
    assert forked["variables"]["counter"] == 100 + 15 + (6 + 7 + 8 + 9 + 10) and forked["variables"]["note"] == "forked"
    commits = [e["step_id"] for e in json.loads(cluster.runctx("history", answer["run_id"], "--json").stdout)["entries"] if e["kind"] == "step"]
    assert sorted(commits) == sorted(["s6", "s7", "s8", "s9", "s10"])  # s1..s5 came with the contexts
    runs = {run["run_id"]: run for run in json.loads(cluster.runctx("runs", "--json").stdout)["runs"]}
    assert runs[answer["run_id"]]["forked_from"] == origin["run_id"]
    assert cluster.wait(origin["run_id"])["variables"]["counter"] == 155  # the origin is left as it is

    for args, words in (
        (("fork", origin["run_id"], "--from", "s99"), "'s99': no commit of that step"),
        (("fork", "no-such-run", "--from", "s1"), "does not exist"),
    ):
        refused = cluster.runctx(*args)
        assert refused.returncode == 1 and words in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert len(json.loads(cluster.runctx("runs", "--json").stdout)["runs"]) == 2  # nothing else was started
