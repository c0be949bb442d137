"""What a worker node must be able to do before it takes work (workers/node_checks.py), against the
real servers, with settings read from RUNCTX_* variables as a node reads them: each failing check
names the setting to change, and `process_checks` reports instead of raising."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from runctx.embedded import Servers as NodeServers
from state.change_events import libpq_url
from state.errors import SettingsError
from state.sealing import Keyring
from state.settings import Settings, get_settings
from state.store import TieredStore
from tests.support.servers import database_url_for, free_port
from tests.support.waiting import wait_for
from workers.node_checks import action_module_problem, check_broker, check_node, process_checks

KEY_A = Keyring.new_entry()
KEY_B = Keyring.new_entry()
ID_A, ID_B = KEY_A.split(":")[0], KEY_B.split(":")[0]
ALL_OK = {"keys": "ok", "schema": "ok", "action_modules": "ok"}


@pytest.fixture
def node_settings(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, database_url: str, key_prefix: str, tmp_path: Path
) -> Iterator[Callable[..., Settings]]:
    """Settings as a node on the test servers reads them from its environment; keyword arguments set
    more RUNCTX_* variables (``action_modules="..."`` sets RUNCTX_ACTION_MODULES)."""
    base = {
        "RUNCTX_REDIS_URL": redis_url, "RUNCTX_DATABASE_URL": database_url, "RUNCTX_KEY_PREFIX": key_prefix,
        "RUNCTX_ENCRYPTION_KEYS": KEY_A, "RUNCTX_ACTION_MODULES": "tests", "RUNCTX_DATA_DIR": str(tmp_path / "data"),
    }
    for name, value in base.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RUNCTX_BROKER_URL", raising=False)

    def settings(**overrides: str) -> Settings:
        for name, value in overrides.items():
            monkeypatch.setenv(f"RUNCTX_{name.upper()}", value)
        get_settings.cache_clear()
        return get_settings()

    yield settings
    get_settings.cache_clear()


def checks_of(settings: Settings) -> dict[str, str]:
    """What `runctx check` hears from a running process with these settings."""
    assert settings.redis_url and settings.database_url
    store = TieredStore.from_settings(settings, settings.redis_url, settings.database_url)
    try:
        return process_checks(store, settings.database_url, settings)
    finally:
        store.close()


def recorded_keys(settings: Settings) -> set[str]:
    assert settings.redis_url and settings.database_url
    store = TieredStore.from_settings(settings, settings.redis_url, settings.database_url)
    try:
        return store.maintenance.key_ids()
    finally:
        store.close()


# ---- all is well -----------------------------------------------------------------------------------


def test_a_node_on_working_servers_passes_every_check_and_records_its_key(node_settings, redis_url: str, database_url: str) -> None:
    settings = node_settings()
    servers = check_node(settings)
    assert (servers.redis_url, servers.database_url, servers.embedded) == (redis_url, database_url, False)
    assert servers.broker_url == redis_url  # the broker defaults to L2's Redis
    assert recorded_keys(settings) == {ID_A}  # the next node is checked against it


def test_a_running_process_reports_ok_for_each_check_when_all_is_well(node_settings) -> None:
    settings = node_settings()
    check_node(settings)
    assert checks_of(settings) == ALL_OK


# ---- the schema ------------------------------------------------------------------------------------


def test_a_database_at_a_revision_this_code_does_not_know_is_refused_naming_the_database_url(node_settings, database_url: str) -> None:
    settings = node_settings()
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'ffff_from_a_newer_runctx'")
    with pytest.raises(SettingsError) as refused:
        check_node(settings)
    assert refused.value.setting == "RUNCTX_DATABASE_URL"
    assert str(refused.value).startswith("RUNCTX_DATABASE_URL: the L3 schema cannot be brought up to date: ")
    assert "ffff_from_a_newer_runctx" in str(refused.value)

    schema = checks_of(settings)["schema"]
    assert schema.startswith("the schema is at revision ffff_from_a_newer_runctx, this code needs ")
    assert schema.endswith("(runctx migrate)")


def test_a_check_that_cannot_reach_its_database_reports_the_error_and_the_others_still_run(node_settings, servers) -> None:
    settings = node_settings()
    check_node(settings)
    store = TieredStore.from_settings(settings, settings.redis_url, settings.database_url)
    try:
        results = process_checks(store, database_url_for(servers.database_url, "runctx_no_such_database"), settings)
    finally:
        store.close()
    assert results["keys"] == "ok" and results["action_modules"] == "ok"
    assert results["schema"].startswith("OperationalError: ") and "runctx_no_such_database" in results["schema"]


# ---- the keys --------------------------------------------------------------------------------------


def test_a_node_lacking_a_key_that_stored_values_were_sealed_under_is_refused_naming_the_keys(node_settings) -> None:
    check_node(node_settings())  # a node with key A was here first
    lacking = node_settings(encryption_keys=KEY_B)
    with pytest.raises(SettingsError) as refused:
        check_node(lacking)
    assert refused.value.setting == "RUNCTX_ENCRYPTION_KEYS"
    assert f"sealed under key(s) {ID_A}, which this process does not have" in str(refused.value)
    assert checks_of(lacking)["keys"] == f"RUNCTX_ENCRYPTION_KEYS lacks key(s) {ID_A} that sealed stored values"
    assert recorded_keys(lacking) == {ID_A}  # a refused node records nothing


def test_a_node_holding_the_old_key_behind_a_new_one_passes(node_settings) -> None:
    check_node(node_settings())
    rotated = node_settings(encryption_keys=f"{KEY_B},{KEY_A}")
    check_node(rotated)
    assert checks_of(rotated) == ALL_OK
    assert recorded_keys(rotated) == {ID_A, ID_B}


# ---- the action modules ----------------------------------------------------------------------------


def test_an_allowed_module_that_cannot_be_imported_is_refused_naming_the_action_modules(node_settings) -> None:
    settings = node_settings(action_modules="tests, no_such_actions_pkg")
    with pytest.raises(SettingsError) as refused:
        check_node(settings)
    assert refused.value.setting == "RUNCTX_ACTION_MODULES"
    assert str(refused.value).startswith(
        "RUNCTX_ACTION_MODULES: module 'no_such_actions_pkg' cannot be imported on this node (ModuleNotFoundError: "
    )
    assert checks_of(settings)["action_modules"].startswith("module 'no_such_actions_pkg' cannot be imported on this node")


def test_a_module_that_fails_while_it_loads_is_reported_with_its_error(node_settings, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "runctx_test_broken_actions.py").write_text('raise RuntimeError("needs a GPU")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = node_settings(action_modules="runctx_test_broken_actions")
    assert action_module_problem(settings) == (
        "module 'runctx_test_broken_actions' cannot be imported on this node (RuntimeError: needs a GPU)"
    )
    assert action_module_problem(node_settings(action_modules="tests,json")) is None
    assert action_module_problem(node_settings(action_modules="")) is None  # built-ins only: nothing to import


# ---- the broker ------------------------------------------------------------------------------------


def test_a_plain_redis_is_a_broker(redis_url: str) -> None:
    check_broker(NodeServers(redis_url=redis_url, database_url="unused", broker_url=redis_url, embedded=False))


@pytest.fixture
def one_node_cluster(tmp_path: Path) -> Iterator[str]:
    """A Redis Cluster of one node holding every slot (the smallest cluster there is); its URL."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is needed for a Redis Cluster")
    port, bus_port = free_port(), free_port()  # the bus port given: port + 10000 may be past 65535
    log = tmp_path / "redis.log"
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--cluster-port", str(bus_port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"),
         "--logfile", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=2)
    try:
        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(answers, 10, "the cluster node")
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_for(lambda: client.cluster("info")["cluster_state"] == "ok", 10, "the cluster to cover every slot")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


def test_a_redis_cluster_cannot_be_the_broker_unless_another_broker_is_set(one_node_cluster: str) -> None:
    with pytest.raises(SettingsError) as refused:
        check_broker(NodeServers(redis_url=one_node_cluster, database_url="unused", broker_url=one_node_cluster, embedded=False))
    assert refused.value.setting == "RUNCTX_BROKER_URL"
    assert "names a node of a Redis Cluster, which cannot be Celery's broker" in str(refused.value)
    check_broker(NodeServers(redis_url=one_node_cluster, database_url="unused", broker_url="amqp://rabbit//", embedded=False))
