"""Large values on real workers: a 50 MB value set by one step, read by the next on another node
and inherited by a child, is stored once, never travels in full through the broker or Redis, and
comes back byte for byte; a secret 1 MB value given at submit is sealed where it is stored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psycopg
import pytest
import redis

from state.change_events import libpq_url
from state.models import StateCacheConfig
from state.store import TieredStore
from tests.support.cluster import HERE
from tests.support.redis_monitor import RedisMonitor
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

SIZE = 50_000_000

ACTIONS = '''
import hashlib, os, socket
def make(view, args):
    big = hashlib.sha256(b"seed").hexdigest() * (args["size"] // 64)
    return {"big": big, "made": hashlib.sha256(big.encode()).hexdigest(), "made_on": socket.gethostname() + str(os.getpid())}
def check(view, args):
    big = view.get("big")
    return {args["into"]: hashlib.sha256(big.encode()).hexdigest(), args["into"] + "_length": len(big), "read_on": str(os.getpid())}
'''


@pytest.mark.parametrize("kept_in", ["L3", "S3"])
def test_a_50_mb_value_is_stored_once_and_read_on_another_node_and_by_a_child(
    make_cluster, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, kept_in: str
) -> None:
    (tmp_path / "big_actions.py").write_text(ACTIONS)
    path = tmp_path / "big.json"
    path.write_text(json.dumps({
        "name": "big-value",
        "steps": [
            {"id": "make", "action": "big_actions:make", "args": {"size": SIZE}},
            {"id": "hold", "wait_for": {"event": "go", "into": "go"}},  # the node that made it stops here
            {"id": "check", "action": "big_actions:check", "args": {"into": "read"}},
            {"id": "child", "inherit": ["big"], "routine": {
                "name": "big-child", "steps": [{"id": "check", "action": "big_actions:check", "args": {"into": "child_read"}}],
            }},
        ],
    }))
    s3 = request.getfixturevalue("s3_server") if kept_in == "S3" else None
    store_env = {"RUNCTX_BLOB_URL": s3.url(), **s3.env} if s3 is not None else {}
    cluster = make_cluster(
        "redis", PYTHONPATH=os.pathsep.join([str(tmp_path), str(HERE)]), RUNCTX_ACTION_MODULES="big_actions,tests", **store_env,
    )
    cluster.start_nodes("n1", concurrency=1)
    monitor = RedisMonitor(cluster.redis_url)
    try:
        run_id = cluster.submit(path)
        wait_for(lambda: '"waiting"' in cluster.runctx("status", run_id, "--json").stdout, 120, "the value to be made")
        cluster.stop()
        cluster.nodes.clear()
        cluster.start_nodes("n2", concurrency=1)  # the value is read on another node
        assert cluster.runctx("signal", run_id, "go").returncode == 0
        result = cluster.wait(run_id, timeout_s=300)
    finally:
        commands = monitor.stop()
    assert result["status"] == "succeeded", result
    variables = result["variables"]
    assert variables["read"] == variables["made"] and variables["read_length"] == SIZE - SIZE % 64
    assert variables["big"]["size"] == SIZE - SIZE % 64 + 2  # the context holds a reference
    steps = {step["id"]: step for step in result["steps"]}
    assert steps["make"]["worker"].startswith("n1") and steps["check"]["worker"].startswith("n2")

    for name, value in (s3.env if s3 is not None else {}).items():  # this process reads the store as the workers do
        monkeypatch.setenv(name, value)
    store = cluster.store() if s3 is None else TieredStore.connect(
        cluster.redis_url, cluster.database_url, config=StateCacheConfig(), prefix=cluster.prefix, keyring=cluster.keyring(),
        blob_url=s3.url(),
    )
    try:
        child = store.read_l3(f"{run_id}/child")
        assert child.variables["child_read"] == variables["made"]  # the child read it too
        assert child.variables["big"] == variables["big"]  # ... by the same reference
        count, stored = store.blobs.usage()
    finally:
        store.close()
    assert count == 1 and SIZE <= stored < SIZE + 1000, (count, stored)  # stored once
    if s3 is not None:
        objects = s3.objects()
        assert len(objects) == 1 and SIZE <= len(next(iter(objects.values()))) < SIZE + 1000
    longest = max((len(arg) for command in commands for arg in command), default=0)
    assert longest < 1_000_000, f"a Redis command carried {longest} bytes"  # never in full through Redis or the broker
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        sizes = [client.memory_usage(key) or 0 for key in client.scan_iter(match=f"{cluster.prefix}*", count=1000)]
    finally:
        client.close()
    assert max(sizes, default=0) < 1_000_000


def test_a_secret_large_value_is_sealed_in_the_blob_store(make_cluster, tmp_path: Path) -> None:
    secret = os.urandom(500_000).hex()  # 1 MB of text
    (tmp_path / "vars.json").write_text(json.dumps({"token": secret}))
    path = tmp_path / "secret.json"
    path.write_text(json.dumps({
        "name": "big-secret", "variables": {"token": {"sensitivity": "secret"}},
        "steps": [{"id": "copy", "action": "copy", "args": {"from": "token", "to": "again"}, "reads": ["token"]}],
    }))
    cluster = make_cluster("redis")
    cluster.start_nodes("n1", concurrency=1)
    result = cluster.run(path, "--var-file", str(tmp_path / "vars.json"))
    assert result["status"] == "succeeded" and result["variables"]["token"] == "***", result
    needle = secret[1000:1064].encode()
    with psycopg.connect(libpq_url(cluster.database_url)) as conn:
        (count,) = conn.execute("SELECT count(*) FROM blobs").fetchone()
        tables = [name for (name,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        found = [table for table in tables for row in conn.execute(f'SELECT * FROM "{table}"') if needle in repr(row).encode()
                 or any(isinstance(cell, (bytes, memoryview)) and needle in bytes(cell) for cell in row)]
    assert count == 1 and not found, found  # one blob (the copy is the same value), sealed
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        leaked = [key for key in client.scan_iter(match=f"{cluster.prefix}*", count=1000)
                  if client.type(key) in (b"string", b"hash") and needle in b"".join(
                      [client.get(key) or b""] if client.type(key) == b"string" else list(client.hgetall(key).values()))]
    finally:
        client.close()
    assert not leaked, leaked
