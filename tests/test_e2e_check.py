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
