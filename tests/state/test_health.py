"""The health check behind `runctx check` (state/health.py) against real servers: the steps it
reports, that it leaves nothing behind (also when it fails), and what it says of Redis persistence
(read from Redis servers of this test's own, each started with one persistence mode)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from state.change_events import libpq_url
from state.errors import HealthCheckFailed
from state.health import PERSISTENCE_COST, persistence_warning, redis_persistence, run_check
from state.settings import Settings
from state.store import TieredStore
from tests.support.servers import free_port
from tests.support.waiting import wait_for

TABLES = ("routines", "encryption_keys", "configurations", "runs", "context_snapshots", "blackboard_entries", "exports")

EXPECTED_STEPS = [
    ("ping", "L2"), ("ping", "L3"), ("create", "L3+L2+L1"), ("read", "L1"), ("read", "L2"), ("read", "L3"),
    ("commit", "L2"), ("flush", "L3"), ("invalidate", "L3->L2"),
]


def row_counts(database_url: str) -> dict[str, int]:
    with psycopg.connect(libpq_url(database_url)) as conn:
        return {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}


def keys_under(redis_url: str, prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        return list(client.scan_iter(match=f"{prefix}:*", count=1000))
    finally:
        client.close()


def test_the_check_takes_a_sample_through_every_tier_and_reports_each_step(redis_url: str, database_url: str, key_prefix: str) -> None:
    steps = run_check(redis_url, database_url, Settings(key_prefix=key_prefix))
    assert [(step.name, step.tier) for step in steps] == EXPECTED_STEPS
    assert all(step.seconds >= 0 and step.detail for step in steps)
    by_name = {(step.name, step.tier): step.detail for step in steps}
    assert by_name[("create", "L3+L2+L1")].startswith("context check-") and by_name[("create", "L3+L2+L1")].endswith("version 1")
    assert by_name[("commit", "L2")] == "compare-and-set to version 2, L3 write scheduled"
    assert by_name[("flush", "L3")] == "write-behind wrote version 2 in one transaction"


def test_the_check_leaves_nothing_in_postgresql_or_redis(redis_url: str, database_url: str, key_prefix: str) -> None:
    before = row_counts(database_url)
    steps = run_check(redis_url, database_url, Settings(key_prefix=key_prefix))
    sample = steps[2].detail.split()[1]  # "context <id> version 1"
    assert row_counts(database_url) == before
    assert keys_under(redis_url, key_prefix) == []
    with psycopg.connect(libpq_url(database_url)) as conn:
        assert conn.execute("SELECT count(*) FROM context_snapshots WHERE run_id = %s", (sample,)).fetchone()[0] == 0


def test_a_check_that_fails_says_which_step_and_still_removes_its_sample(
    redis_url: str, database_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = row_counts(database_url)
    monkeypatch.setattr(TieredStore, "flush", lambda self, context_id: False)  # the write-behind does nothing
    with pytest.raises(HealthCheckFailed, match="write-behind did not bring the change to PostgreSQL"):
        run_check(redis_url, database_url, Settings(key_prefix=key_prefix))
    assert row_counts(database_url) == before
    assert keys_under(redis_url, key_prefix) == []


# ---- Redis persistence ------------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start a Redis of this test's own with the given options; its URL once it answers."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is needed to start a Redis with a given persistence mode")
    started: list[subprocess.Popen] = []

    def start(*options: str) -> str:
        port = free_port()
        work = tmp_path / f"redis-{port}"
        work.mkdir()
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), *options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        started.append(process)
        url = f"redis://127.0.0.1:{port}/0"

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server {' '.join(options)} exited with {process.returncode}")
            try:
                with redis.Redis.from_url(url, socket_timeout=1) as client:
                    return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(answers, 10, f"redis-server on port {port}")
        return url

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize(
    ("options", "mode"),
    [
        (("--appendonly", "no", "--save", ""), "none"),
        (("--appendonly", "no", "--save", "900 1"), "rdb"),
        (("--appendonly", "yes", "--appendfsync", "always"), "aof-always"),
        (("--appendonly", "yes", "--appendfsync", "everysec"), "aof-everysec"),
        (("--appendonly", "yes", "--appendfsync", "no", "--save", ""), "aof-no"),
    ],
)
def test_redis_persistence_tells_how_a_redis_keeps_data_across_a_restart(private_redis, options: tuple[str, ...], mode: str) -> None:
    assert redis_persistence(private_redis(*options)) == mode


def test_a_redis_that_refuses_config_or_cannot_be_reached_has_unknown_persistence(private_redis) -> None:
    url = private_redis("--save", "")
    with redis.Redis.from_url(url) as admin:
        admin.execute_command("ACL", "SETUSER", "app", "on", ">app-pw", "~*", "+@all", "-config")
    assert redis_persistence(url.replace("redis://", "redis://app:app-pw@")) == "unknown"  # as managed services do
    assert redis_persistence(f"redis://127.0.0.1:{free_port()}/0") == "unknown"


def test_the_test_redis_has_a_persistence_mode_runctx_knows(redis_url: str) -> None:
    assert redis_persistence(redis_url) in PERSISTENCE_COST


# ---- the warning ------------------------------------------------------------------------------------


def test_a_redis_that_keeps_nothing_on_disk_is_warned_about_with_the_cost_and_the_fix() -> None:
    warning = persistence_warning("none")
    assert warning is not None
    assert warning.startswith("Redis keeps nothing on disk: after a restart every running run is rewound to what PostgreSQL holds")
    assert PERSISTENCE_COST["none"] in warning and "appendonly yes" in warning


def test_a_redis_whose_persistence_cannot_be_read_is_warned_about() -> None:
    warning = persistence_warning("unknown")
    assert warning is not None and "CONFIG refused" in warning and "Redis and durability" in warning


@pytest.mark.parametrize("mode", ["aof-always", "aof-everysec", "aof-no", "rdb"])
def test_a_redis_that_keeps_data_on_disk_is_not_warned_about(mode: str) -> None:
    assert persistence_warning(mode) is None
