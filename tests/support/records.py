"""Watching runs on real worker processes: their step records in Redis, the steps executing now
(Celery's remote control), the write-behind still pending."""

from __future__ import annotations

import json
from typing import Any

import redis
from celery import Celery

from tests.support.waiting import wait_for


def step_records(client: redis.Redis, prefix: str, run_id: str) -> dict[str, dict[str, Any]]:
    """The run's step outcomes so far (run records in Redis): step id -> {status, worker, ...}."""
    from state.keys import RedisKeys

    out = {}
    for records in RedisKeys(prefix).step_records(run_id):
        out.update({key.decode(): json.loads(value) for key, value in client.hgetall(records).items()})
    return out


def control_app(cluster) -> Celery:
    """A bare Celery app on the cluster's broker, for remote control (inspect) of its nodes."""
    app = Celery("runctx-test-control", broker=cluster.broker_url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True
    return app


def active_steps(app: Celery, cluster, run_id: str) -> list[dict[str, Any]]:
    """The run's steps executing now: [{short, pid, step_id}] (pid: the pool process running it)."""
    names = {cluster.node_name(short): short for short, process in cluster.nodes.items() if process.poll() is None}
    replies = app.control.inspect(destination=list(names), timeout=1.0).active() or {}
    found = []
    for name, tasks in replies.items():
        for task in tasks:
            kwargs = task.get("kwargs") or {}
            if task.get("type") == "runctx.step" and kwargs.get("run_id") == run_id:
                found.append({"short": names[name], "pid": task.get("worker_pid"), "step_id": kwargs.get("step_id")})
    return found


def wait_no_pending_flush(store, timeout_s: float = 20.0) -> None:
    """Until L2 holds no change still waiting for its write-behind to L3."""
    wait_for(lambda: store.l2.pending_flushes() == 0, timeout_s, "no pending write-behind", interval_s=0.1)
