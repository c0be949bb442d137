"""`runctx check` against running workers: Redis's persistence and every process's change listener."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_check_reports_every_worker_process_listener_and_warns_of_a_redis_without_persistence(make_cluster, servers) -> None:
    cluster = make_cluster()
    cluster.start_nodes("a", "b", concurrency=2)
    done = cluster.runctx("check", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["worker_processes"] == 4 and report["listeners_alive"] == 4
    human = cluster.runctx("check")
    assert human.returncode == 0
    assert "worker processes: 4 answered, 4 with a live change listener" in human.stdout
    if servers.embedded:  # the embedded Redis keeps an append-only file
        assert report["redis_persistence"] == "aof-everysec" and report["warnings"] == []
    else:  # the machine's test Redis keeps nothing on disk (CI starts it so)
        assert report["redis_persistence"] == "none"
        assert any("keeps nothing on disk" in warning for warning in report["warnings"])
        assert "warning: Redis keeps nothing on disk" in human.stderr


@pytest.mark.slow
def test_check_reports_the_start_checks_of_every_running_worker_process(make_cluster) -> None:
    from state.sealing import Keyring

    cluster = make_cluster()
    cluster.start_nodes("a", "b", concurrency=1)
    report = json.loads(cluster.runctx("check", "--json").stdout)
    assert len(report["workers"]) == 2
    for process in report["workers"]:
        assert process["checks"] == {"keys": "ok", "schema": "ok", "action_modules": "ok"}, process

    # Another process seals with a key these workers do not hold (a rotation they were not told of).
    store = cluster.store()
    try:
        newer = Keyring.parse(Keyring.new_entry())
        store.maintenance.check_keys(Keyring(newer.keys + cluster.keyring().keys))
    finally:
        store.close()
    done = cluster.runctx("check", "--json")
    report = json.loads(done.stdout)
    for process in report["workers"]:
        assert newer.newest in process["checks"]["keys"] and "RUNCTX_ENCRYPTION_KEYS" in process["checks"]["keys"]
    assert sum(f"keys: RUNCTX_ENCRYPTION_KEYS lacks key(s) {newer.newest}" in w for w in report["warnings"]) == 2
    human = cluster.runctx("check")
    assert "2 answered" in human.stdout and "0 passing their checks" in human.stdout
