"""Waiting for the outside world on real workers: a run waiting for a signal holds no task message
and no worker, survives both worker nodes restarted and its Redis flushed, and finishes once
signalled; a signal sent before the wait is consumed on arrival; a deadline fires once with both
nodes down across it; each item of a fan-out waits for its own event; what `runctx signal` refuses
is one line and stores nothing. (Secrets by `signal --var-file`: tests/e2e/test_secret.py.)"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.cluster import Cluster
from tests.support.records import control_app
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

STALL_S = "3"  # the watchdog scans often: a waiting run must not look stalled to it


def _tick(step_id: str) -> dict[str, Any]:
    return {"id": step_id, "action": "append", "args": {"name": "ran", "value": step_id}}


def _states(cluster: Cluster, run_id: str) -> dict[str, Any]:
    done = cluster.runctx("status", run_id, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _wait_until_waiting(cluster: Cluster, run_id: str, events: int = 1) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def waiting() -> bool:
        found.update(_states(cluster, run_id))
        return found["status"] == "waiting" and len(found["waiting_for"]) == events

    wait_for(waiting, 60, lambda: f"run {run_id} to wait: {found.get('status')} {found.get('waiting_for')}", 0.2)
    return found


def _nothing_queued_or_running(cluster: Cluster, broker: redis.Redis) -> None:
    """No task message in the broker (queues, unacked set) and no task on any node."""
    queued = {key: broker.llen(key) for key in broker.scan_iter() if broker.type(key) == b"list"}
    assert all(length == 0 for length in queued.values()), queued
    assert broker.hlen("unacked") == 0
    app = control_app(cluster)
    try:
        inspect = app.control.inspect(destination=[cluster.node_name(short) for short in cluster.nodes], timeout=2.0)
        busy = {name: tasks for name, tasks in {**(inspect.active() or {}), **(inspect.reserved() or {})}.items() if tasks}
    finally:
        app.close()
    assert busy == {}, busy


def test_a_waiting_run_holds_nothing_survives_restarts_and_a_redis_flush(own_redis, cluster_on, tmp_path: Path) -> None:
    cluster = cluster_on(own_redis.url(0), own_redis.url(0), RUNCTX_STALL_TIMEOUT_S=STALL_S)
    cluster.start_nodes("n1", "n2", concurrency=2)
    path = tmp_path / "approval.json"
    path.write_text(json.dumps({
        "name": "approval", "variables": {"ran": []},
        "steps": [_tick("draft"), _tick("review"), {"id": "approve", "wait_for": {"event": "approve", "into": "decision"}}, _tick("publish")],
    }))
    run_id = cluster.submit(path)
    states = _wait_until_waiting(cluster, run_id)
    assert states["waiting_for"][0]["event"] == "approve" and states["waiting_for"][0]["step"] == "approve"
    assert {step["id"]: step["state"] for step in states["steps"]}["approve"] == "waiting"
    listed = json.loads(cluster.runctx("runs", "--status", "waiting", "--json").stdout)["runs"]
    assert [(run["run_id"], run["waiting_for"]) for run in listed] == [(run_id, ["approve"])]

    broker = redis.Redis.from_url(own_redis.url(0))
    _nothing_queued_or_running(cluster, broker)

    cluster.stop()  # both nodes down, then Redis loses everything: the run's state is in L3
    broker.flushall()
    cluster.start_nodes("n1", "n2", concurrency=2)
    assert _states(cluster, run_id)["status"] == "waiting"

    sent = cluster.runctx("signal", run_id, "approve", "--var", "ok=true", "--var", "by=ann", "--json")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout) == {"run_id": run_id, "event": "approve", "delivered": True, "step": "approve"}
    result = cluster.wait(run_id, timeout_s=90)
    assert result["status"] == "succeeded", result
    assert result["variables"]["decision"] == {"ok": True, "by": "ann"}
    assert result["variables"]["ran"] == ["draft", "review", "publish"]  # each step applied once
    history = json.loads(cluster.runctx("history", run_id, "--json").stdout)["entries"]
    commits = [entry["step_id"] for entry in history if entry["kind"] == "step"]
    assert sorted(commits) == ["approve", "draft", "publish", "review"], commits
    events = [entry["status"] for entry in history if entry["kind"] == "event"]
    # Redis came back empty: the signalled step found no L2 state and the run was rebuilt from L3, once.
    assert events.index("waiting") < events.index("signalled") and events.count("rewound") <= 1, events


def test_an_early_signal_is_kept_and_consumed_when_the_run_comes_to_wait(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=2)
    path = tmp_path / "early.json"
    path.write_text(json.dumps({
        "name": "early",
        "steps": [{"id": "slow", "action": "sleep", "args": {"seconds": 3}}, {"id": "go", "wait_for": {"event": "go", "into": "payload"}}],
    }))
    run_id = cluster.submit(path)
    sent = cluster.runctx("signal", run_id, "go", "--var", "n=7")
    assert sent.returncode == 0 and "kept until a step waits for it" in sent.stdout, sent.stderr
    result = cluster.wait(run_id, timeout_s=60)
    assert result["status"] == "succeeded" and result["variables"]["payload"] == {"n": 7}, result
    again = cluster.runctx("signal", run_id, "go", "--var", "n=8")
    assert again.returncode == 1 and "has ended (succeeded)" in again.stderr  # ended: one line
    assert len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr


def test_a_deadline_fires_once_with_both_nodes_down_across_it(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis", RUNCTX_STALL_TIMEOUT_S=STALL_S)
    cluster.start_nodes("n1", "n2", concurrency=1)
    path = tmp_path / "deadline.json"
    path.write_text(json.dumps({
        "name": "deadline", "variables": {"ran": []},
        "steps": [
            _tick("ask"),
            {"id": "answer", "wait_for": {"event": "answer", "into": "reply", "timeout_s": 4, "on_timeout": "continue"}},
            _tick("after"),
        ],
    }))
    run_id = cluster.submit(path)
    deadline = _wait_until_waiting(cluster, run_id)["waiting_for"][0]["deadline"]
    cluster.stop()
    expires = datetime.fromisoformat(deadline).timestamp()
    wait_for(lambda: time.time() > expires + 1, 30, "the wait's deadline to pass with every node down", 0.2)
    assert _states(cluster, run_id)["status"] == "waiting"  # nobody was up to fire it
    cluster.start_nodes("n1", "n2", concurrency=1)
    result = cluster.wait(run_id, timeout_s=60)
    assert result["status"] == "succeeded", result
    assert result["variables"]["reply"] is None and result["variables"]["ran"] == ["ask", "after"]
    history = json.loads(cluster.runctx("history", run_id, "--json").stdout)["entries"]
    assert [entry["status"] for entry in history if entry["kind"] == "event"].count("timed_out") == 1
    late = cluster.runctx("signal", run_id, "answer")
    assert late.returncode == 1 and "has ended" in late.stderr


def test_each_item_waits_for_its_own_event_and_refusals_store_nothing(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", "n2", concurrency=2)
    path = tmp_path / "per-item.json"
    path.write_text(json.dumps({
        "name": "per-item", "variables": {"docs": ["a", "b", "c"]},
        "steps": [{
            "id": "each", "for_each": "docs", "as": "doc",
            "steps": [{"id": "approve", "wait_for": {"event": "approve-{doc}", "into": "verdict"}}],
            "collect": {"from": "verdict", "into": "verdicts"},
        }],
    }))
    run_id = cluster.submit(path)
    states = _wait_until_waiting(cluster, run_id, events=3)
    assert sorted(wait["event"] for wait in states["waiting_for"]) == ["approve-a", "approve-b", "approve-c"]

    def refused(*args: str, code: int, says: str) -> None:
        done = cluster.runctx("signal", *args)
        assert done.returncode == code and says in done.stderr, (done.returncode, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr

    refused("no-such-run", "approve-a", code=1, says="does not exist")
    refused(run_id, "reject", code=1, says="waits for no event 'reject' (it waits for: approve-{doc})")
    refused(run_id, "two words", code=1, says="letters, digits")
    for doc in ("c", "a"):
        assert cluster.runctx("signal", run_id, f"approve-{doc}", "--var", f"by={doc}").returncode == 0
    refused(run_id, "approve-a", code=3, says="consumed it")
    assert _states(cluster, run_id)["status"] == "waiting"  # b still waits
    assert cluster.runctx("signal", run_id, "approve-b", "--var", "by=b").returncode == 0
    result = cluster.wait(run_id, timeout_s=60)
    assert result["status"] == "succeeded", result
    assert result["variables"]["verdicts"] == [{"by": "a"}, {"by": "b"}, {"by": "c"}]
