"""The routine language on real workers: a fan-out over a list, conditions, retries with backoff,
time limits and failure policies, as `runctx run` runs them on prefork worker nodes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.language_actions import ME
from tests.support.records import step_records
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def run(cluster, tmp_path: Path, routine: dict[str, Any], timeout_s: int = 240) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    path = tmp_path / f"{routine['name']}.json"
    path.write_text(json.dumps(routine))
    done = cluster.runctx("run", str(path), "--json", "--timeout", str(timeout_s), timeout_s=timeout_s + 30)
    try:
        return done, json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(f"runctx run printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}") from None


def status(cluster, run_id: str) -> dict[str, Any]:
    done = cluster.runctx("status", run_id, "--json")
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def most_in_flight(steps: list[dict[str, Any]]) -> int:
    """The most steps whose [start, finish] overlap, from their records (start = finish - duration)."""
    edges = []
    for step in steps:
        finished = step["finished_at"]
        edges += [(finished - step["duration_s"], 1), (finished, -1)]
    most = current = 0
    for _, change in sorted(edges, key=lambda edge: (edge[0], edge[1])):
        current += change
        most = max(most, current)
    return most


def fan_out(items: int, concurrency: int, nap_s: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {
        "name": f"fan{items}x{concurrency}",
        "variables": {"numbers": list(range(items))},
        "steps": [
            {
                "id": "each", "for_each": "numbers", "as": "n", "max_concurrency": concurrency,
                "steps": [{"id": "square", "action": f"{ME}:square", "args": {"item": "n", "nap_s": nap_s}}],
                "collect": {"from": "out", "into": "squares"}, **extra,
            }
        ],
    }


def test_a_fan_out_over_1000_items_collects_every_result_in_order_within_its_concurrency(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    done, result = run(cluster, tmp_path, fan_out(1000, 20))
    assert done.returncode == 0 and result["status"] == "succeeded", (result, done.stderr[-2000:])
    assert result["variables"]["squares"] == [n * n for n in range(1000)]
    row = cluster.store().ledger.get_run(result["run_id"])
    items = [step for step in row.meta["steps"] if step["id"].startswith("each[")]
    assert sorted(step["id"] for step in items) == sorted(f"each[{n}]/square" for n in range(1000))
    assert most_in_flight(items) <= 20

    # The bound bites where the workers could run more at once (4 processes, 2 items at a time).
    done, result = run(cluster, tmp_path, fan_out(24, 2, nap_s=0.1))
    assert result["status"] == "succeeded", result
    items = [step for step in cluster.store().ledger.get_run(result["run_id"]).meta["steps"] if step["id"].startswith("each[")]
    assert len(items) == 24 and most_in_flight(items) <= 2


def test_an_empty_list_runs_nothing_and_goes_on(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=2)
    done, result = run(cluster, tmp_path, {**fan_out(0, 5), "name": "empty"})
    assert result["status"] == "succeeded" and result["variables"]["squares"] == [], result


def test_tolerate_failures_succeeds_at_the_limit_and_fails_one_past_it(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)

    def routine(bad: list[int]) -> dict[str, Any]:
        return {
            "name": f"tolerant{len(bad)}",
            "variables": {"numbers": list(range(10))},
            "steps": [
                {
                    "id": "each", "for_each": "numbers", "max_concurrency": 4,
                    "steps": [{"id": "check", "action": f"{ME}:fail_some", "args": {"bad": bad}}],
                    "collect": {"from": "out", "into": "outs"}, "tolerate_failures": 2, "failures_into": "failed",
                },
                {"id": "after", "action": "set", "args": {"name": "went_on", "value": True}},
            ],
        }

    done, result = run(cluster, tmp_path, routine([3, 7]))
    assert result["status"] == "succeeded", result
    assert result["variables"]["outs"] == [0, 1, 2, None, 4, 5, 6, None, 8, 9] and result["variables"]["went_on"] is True
    failed = result["variables"]["failed"]
    assert [f["item"] for f in failed] == [3, 7] and all(f["step"].endswith("/check") and f["type"] == "ValueError" for f in failed)
    assert "item 3 is bad" in failed[0]["error"]

    done, result = run(cluster, tmp_path, routine([1, 3, 7]))
    assert done.returncode != 0 and result["status"] == "failed", result
    assert "3 of 10 items failed, more than the 2 tolerated" in result["error"]


def test_when_skips_and_runs(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=2)
    routine = {
        "name": "conditions",
        "variables": {"size": 12},
        "steps": [
            {"id": "small", "when": "size < 10", "action": "set", "args": {"name": "kind", "value": "small"}},
            {"id": "large", "when": "size >= 10", "action": "set", "args": {"name": "kind", "value": "large"}},
        ],
    }
    done, result = run(cluster, tmp_path, routine)
    assert result["status"] == "succeeded" and result["variables"]["kind"] == "large", result
    steps = {step["id"]: step for step in status(cluster, result["run_id"])["steps"]}
    assert steps["small"]["state"] == "skipped" and steps["small"]["reason"] == "when 'size < 10' was false"
    assert steps["large"]["state"] == "done"


def test_a_retry_with_backoff_runs_exactly_max_attempts_times_with_the_delays_in_its_records(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=2)
    counter = tmp_path / "calls"
    routine = {
        "name": "retrying",
        "steps": [
            {
                "id": "call", "action": f"{ME}:flaky", "args": {"counter": str(counter), "succeed_on": 99},
                "retry": {"max_attempts": 3, "backoff_s": 0.5, "backoff_rate": 2, "on": ["ConnectionError"]},
            }
        ],
    }
    done, result = run(cluster, tmp_path, routine)
    assert result["status"] == "failed" and "ConnectionError" in result["error"], result
    assert counter.read_text() == "3"  # exactly max_attempts calls
    call = {step["id"]: step for step in status(cluster, result["run_id"])["steps"]}["call"]
    retries = call["retries"]
    assert [r["attempt"] for r in retries] == [1, 2] and [r["retry_in_s"] for r in retries] == [0.5, 1.0]
    assert call["attempts"] == 3 and call["state"] == "failed"

    # It succeeds on its third call: the run goes on.
    counter.unlink()
    routine["steps"][0]["args"]["succeed_on"] = 3
    done, result = run(cluster, tmp_path, {**routine, "name": "retrying2"})
    assert result["status"] == "succeeded" and result["variables"]["calls"] == 3, result


def test_a_step_past_its_timeout_fails_the_run_and_the_worker_takes_the_next_task(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=1)
    routine = {"name": "slow", "steps": [{"id": "hang", "action": f"{ME}:nap", "args": {"s": 30}, "timeout_s": 2}]}
    done, result = run(cluster, tmp_path, routine, timeout_s=60)
    assert result["status"] == "failed" and result["error"] == "step 'hang' timed out after 2 s", result
    done, result = run(cluster, tmp_path, {"name": "next", "steps": [{"id": "a", "action": "set", "args": {"name": "x", "value": 1}}]})
    assert result["status"] == "succeeded", result


def test_on_failure_continue_stores_the_masked_error_and_goes_on(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=2)
    routine = {
        "name": "carry_on",
        "variables": {"token": {"sensitivity": "secret"}},
        "steps": [
            {"id": "bad", "action": "fail", "args": {"message": "the service said no"}, "on_failure": "continue", "error_into": "err"},
            {
                "id": "group", "on_failure": "continue", "error_into": "branch_errors",
                "parallel": [
                    [{"id": "ok", "action": "set", "args": {"name": "ok", "value": 1}}],
                    [{"id": "broken", "action": "fail", "args": {"message": "branch broke"}},
                     {"id": "never", "action": "set", "args": {"name": "never", "value": 1}}],
                ],
            },
            {"id": "after", "action": "set", "args": {"name": "went_on", "value": True}},
        ],
    }
    path = tmp_path / "vars.json"
    path.write_text(json.dumps({"token": "s3cr3t-value"}))
    routine_path = tmp_path / "carry_on.json"
    routine_path.write_text(json.dumps(routine))
    done = cluster.runctx("run", str(routine_path), "--var-file", str(path), "--json", "--timeout", "120", timeout_s=150)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "succeeded", (result, done.stderr[-2000:])
    variables = result["variables"]
    assert variables["err"] == {"step": "bad", "type": "StepFailed", "error": "the service said no"}
    assert variables["went_on"] is True and variables["ok"] == 1 and "never" not in variables
    assert [e["step"] for e in variables["branch_errors"]] == ["broken"]


def test_a_run_past_its_routine_timeout_ends_failed_saying_so(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=2)
    routine = {"name": "too_long", "timeout_s": 3, "steps": [{"id": "slow", "action": f"{ME}:nap", "args": {"s": 20}}]}
    done, result = run(cluster, tmp_path, routine, timeout_s=60)
    assert result["status"] == "failed" and result["error"] == "the run timed out after 3 s", result


def test_a_node_killed_mid_fan_out_loses_no_item_and_applies_each_once(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis", RUNCTX_VISIBILITY_TIMEOUT_S="10")
    cluster.start_nodes("n1", "n2", concurrency=2)
    client = redis.Redis.from_url(cluster.redis_url)
    effects = f"{cluster.prefix}:effects"
    items = 40
    routine = {
        "name": "killed_mid_fan_out",
        "variables": {"numbers": list(range(items))},
        "steps": [
            {
                "id": "each", "for_each": "numbers", "as": "n", "max_concurrency": 4,
                "steps": [{"id": "tick", "action": "tests.support.fault_actions:tick", "args": {
                    "effects_url": cluster.redis_url, "effects_key": effects, "step": "x", "sleep": 0.3, "value": 1}}],
                "collect": {"from": "log", "into": "logs"},
            }
        ],
    }
    path = tmp_path / "killed.json"
    path.write_text(json.dumps(routine))
    run_id = cluster.submit(path)
    wait_for(lambda: len(step_records(client, cluster.prefix, run_id)) >= 10, 60, "ten items to end", 0.05)
    cluster.kill_node("n1")
    result = cluster.wait(run_id, timeout_s=180)
    assert result["status"] == "succeeded", result
    assert result["variables"]["logs"] == [[1]] * items  # every item, in order, its change applied once
    records = step_records(client, cluster.prefix, run_id)
    assert sorted(step_id for step_id in records if step_id.startswith("each[")) == sorted(f"each[{n}]/tick" for n in range(items))
    executions = int(client.hget(effects, "x") or 0)
    # An item running on the killed node ran again on the survivor; no other ran twice.
    assert items <= executions <= items + 2, executions
