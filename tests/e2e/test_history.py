"""A run's history on real workers, as `runctx history`, `context --at` and `diff` show it: every
step's commit with what it changed, the skipped, retried and failed steps in between, a fan-out's
items, the context at any step replayed from the history, and no sensitive value in plain text."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from state.change_events import libpq_url
from tests.support.language_actions import ME

pytestmark = pytest.mark.slow

SECRET = "history-secret-0d9c41"
CONFIDENTIAL = "history-confidential-77a2e0"


def runctx_json(cluster, *args: str) -> Any:
    done = cluster.runctx(*args, "--json")
    assert done.returncode == 0, f"runctx {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def routine(counter_file: Path) -> dict[str, Any]:
    inc = lambda step_id: {"id": step_id, "action": "increment", "args": {"name": "counter"}}  # noqa: E731
    return {
        "name": "history-e2e",
        "variables": {
            "counter": 0, "flag": False, "numbers": [1, 2, 3],
            "token": {"sensitivity": "secret"}, "pin": {"sensitivity": "confidential"},
        },
        "steps": [
            *[inc(f"s{i}") for i in range(1, 6)],
            {"id": "par", "parallel": [[inc("a1")], [{"id": "b1", "action": "append", "args": {"name": "log", "value": "b"}}]]},
            {"id": "skipme", "when": "flag", "action": "set", "args": {"name": "never", "value": True}},
            {
                "id": "call", "action": f"{ME}:flaky", "args": {"counter": str(counter_file), "succeed_on": 2},
                "retry": {"max_attempts": 3, "backoff_s": 0.2, "on": ["ConnectionError"]},
            },
            {
                "id": "each", "for_each": "numbers", "as": "n",
                "steps": [{"id": "square", "action": f"{ME}:square", "args": {"item": "n"}}],
                "collect": {"from": "out", "into": "squares"},
            },
            inc("last"),
        ],
    }


def test_history_shows_every_step_what_it_changed_and_the_context_at_any_step(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    path = tmp_path / "history.json"
    path.write_text(json.dumps(routine(tmp_path / "calls")))
    var_file = tmp_path / "vars.yaml"
    var_file.write_text(f"token: {SECRET}\npin: {CONFIDENTIAL}\n")
    result = cluster.run(path, "--var-file", str(var_file), timeout_s=180)
    assert result["status"] == "succeeded", result
    run_id = result["run_id"]
    assert result["variables"]["counter"] == 7 and result["variables"]["squares"] == [1, 4, 9]

    found = runctx_json(cluster, "history", run_id)
    entries = found["entries"]
    assert found["total"] == len(entries) and found["status"] == "succeeded"
    commits = {e["step_id"]: e for e in entries if e["kind"] == "step"}
    # Each increment's entry: its worker, its times, the version it made and the counter after it.
    for i in range(1, 6):
        entry = commits[f"s{i}"]
        assert entry["changes"] == [{"name": "counter", "op": "set", "scope": "variables", "sensitivity": "public", "value": i}]
        assert entry["worker"] != "-" and entry["started"] <= entry["at"] and entry["version"] == entry["previous"] + 1
    assert {"a1", "b1", "call", "each", "last"} <= commits.keys()
    assert commits["call"]["attempt"] == 2 and commits["call"]["changes"][0]["value"] == 2
    events = [(e["step_id"], e["status"]) for e in entries if e["kind"] == "event"]
    assert ("skipme", "skipped") in events and ("call", "retried") in events and ("", "succeeded") in events
    # A fan-out's items: each created with its item, its step committed in its own context.
    items = [e for e in entries if e["context"].startswith("each[")]
    assert {e["context"] for e in items if e["kind"] == "created"} == {"each[0]", "each[1]", "each[2]"}
    assert sorted(e["changes"][0]["value"] for e in items if e["step_id"].endswith("/square")) == [1, 4, 9]
    created = next(e for e in entries if e["kind"] == "created" and e["context"] == "")
    shown = {change["name"]: change["value"] for change in created["changes"]}
    assert shown["token"] == "***" and shown["pin"] == "***" and shown["counter"] == 0

    # One context's history; the context just after step 3, replayed; the difference of two steps.
    item = runctx_json(cluster, "history", run_id, "--context", "each[1]")
    assert {e["context"] for e in item["entries"]} == {"each[1]"} and item["total"] == len(item["entries"]) >= 2
    at = runctx_json(cluster, "context", run_id, "--at", "s3")
    assert at["variables"]["counter"] == 3 and at["variables"]["token"] == "***" and at["version"] == commits["s3"]["version"]
    assert at["changed"] == [{"name": "counter", "op": "set", "sensitivity": "public", "before": 2, "existed": True, "after": 3}]
    final = runctx_json(cluster, "context", run_id, "--at", "last")
    assert {k: v for k, v in final["variables"].items() if k not in ("token", "pin")} == {
        k: v for k, v in result["variables"].items() if k not in ("token", "pin")
    }
    diff = runctx_json(cluster, "diff", run_id, "s1", "call")
    rows = {row["name"]: row for row in diff["changes"]}
    assert rows["counter"] == {"name": "counter", "change": "changed", "before": 1, "after": 6}
    assert rows["calls"]["change"] == "added" and rows["log"]["after"] == ["b"] and "token" not in rows

    # The human form: a line per step, the counter it left.
    text = cluster.runctx("history", run_id)
    assert text.returncode == 0 and "s3" in text.stdout and "counter = 3" in text.stdout and "skipped" in text.stdout

    # Nowhere in plain text: the commands' output, L3's history rows.
    outputs = [cluster.runctx(*args).stdout for args in (
        ("history", run_id, "--json"), ("history", run_id), ("context", run_id, "--at", "last", "--json"),
        ("diff", run_id, "s1", "last", "--json"),
    )]
    with psycopg.connect(libpq_url(cluster.database_url)) as conn:
        rows_text = conn.execute("SELECT entry::text FROM step_history WHERE run_id = %s", (run_id,)).fetchall()
    assert rows_text, "the history reached L3"
    for text_ in [*outputs, *(row[0] for row in rows_text)]:
        assert SECRET not in text_ and CONFIDENTIAL not in text_


def test_history_commands_say_one_line_for_what_does_not_exist(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=1)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"name": "tiny", "variables": {"n": 0}, "steps": [{"id": "one", "action": "increment", "args": {"name": "n"}}]}))
    run_id = cluster.run(path)["run_id"]
    for args, words in (
        (("history", "no-such-run"), "does not exist"),
        (("context", run_id, "--at", "nope"), "'nope' is not in the history"),
        (("diff", run_id, "one", "one"), "two different steps"),
        (("history", run_id, "--context", "elsewhere"), "has no context"),
    ):
        done: subprocess.CompletedProcess[str] = cluster.runctx(*args)
        assert done.returncode == 1 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
        assert "Traceback" not in done.stderr
