"""Key rotation on real worker processes while a run goes on: no run fails, every value still opens,
and afterwards the old key can be dropped (nothing is sealed under it any more)."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

from state.change_events import libpq_url
from state.sealing import Keyring
from tests.support.records import step_records
from tests.support.waiting import wait_for

STEPS = 40


def _routine(path: Path) -> Path:
    steps = [{"id": "keep", "action": "copy", "args": {"from": "token", "to": "token_copy"}, "reads": ["token"]}]
    for n in range(STEPS):
        steps.append({"id": f"s{n:02d}", "action": "increment", "args": {"name": "counter"}})
        if n % 4 == 3:
            steps.append({"id": f"pause{n:02d}", "action": "sleep", "args": {"seconds": 0.15}})
    path.write_text(json.dumps({"name": "rotation", "variables": {"token": {"sensitivity": "secret"}, "counter": 0}, "steps": steps}))
    return path


def _stop_node(cluster, short: str) -> None:
    process = cluster.nodes[short]
    process.send_signal(signal.SIGTERM)  # warm shutdown: the step it runs finishes first
    process.wait(60)


@pytest.mark.slow
def test_rotating_keys_while_a_run_goes_on_fails_nothing_and_frees_the_old_key(make_cluster, tmp_path: Path) -> None:
    old, new = Keyring.new_entry(), Keyring.new_entry()
    old_id = old.split(":")[0]
    secret = f"rot-secret-{uuid.uuid4().hex}"
    routine = _routine(tmp_path / "rotation.json")
    var_file = tmp_path / "vars.json"
    var_file.write_text(json.dumps({"token": secret}))

    cluster = make_cluster("redis", RUNCTX_ENCRYPTION_KEYS=old)
    cluster.start_nodes("n1", concurrency=2)
    finished = cluster.run(routine, "--var-file", str(var_file), timeout_s=120)
    assert finished["status"] == "succeeded", finished
    in_flight = cluster.submit(routine, "--var-file", str(var_file))
    client = redis.Redis.from_url(cluster.redis_url)
    try:  # a few steps in, all sealed under the old key
        wait_for(lambda: len(step_records(client, cluster.prefix, in_flight)) >= 5, 60, "five steps of the run done")
    finally:
        client.close()

    # Every worker learns the new key (newest first, the old one kept), then the rotation runs.
    cluster.extra_env["RUNCTX_ENCRYPTION_KEYS"] = f"{new},{old}"
    cluster.start_nodes("n2", concurrency=2)
    _stop_node(cluster, "n1")
    rotated = cluster.runctx("keys", "rotate", "--json", "--batch", "5")
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["key"] == new.split(":")[0]

    result = cluster.wait(in_flight, timeout_s=120)
    assert result["status"] == "succeeded", result
    assert result["variables"]["counter"] == STEPS and result["variables"]["token"] == "***"

    # The old key can go: a process with the new key alone starts, and every value opens.
    cluster.extra_env["RUNCTX_ENCRYPTION_KEYS"] = new
    store = cluster.store()
    try:
        store.maintenance.check_keys(Keyring.parse(new))
        for run_id in (finished["run_id"], in_flight):
            context = store.l3.get_context(run_id)
            assert context.variables["token"] == secret and context.variables["token_copy"] == secret
            assert context.variables["counter"] == STEPS
    finally:
        store.close()
    with psycopg.connect(libpq_url(cluster.database_url)) as conn:
        sealed_under_old = conn.execute(
            "SELECT count(*) FROM context_snapshots WHERE position(%s in document::text) > 0", (f"v1.{old_id}.",)
        ).fetchone()[0]
        assert sealed_under_old == 0
        everything = " ".join(str(row) for row in conn.execute("SELECT document::text FROM context_snapshots"))
        assert secret not in everything
