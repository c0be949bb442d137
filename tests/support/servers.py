"""The servers the tests run on (named by RUNCTX_TEST_* or the embedded stack), and throwaway
databases on them. The fixtures that hand these out are in tests/conftest.py."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg

from state.change_events import libpq_url


@dataclass(frozen=True)
class Servers:
    redis_url: str
    database_url: str  # the admin database: tests create their own next to it
    embedded: bool


# The brokers end-to-end tests run on: Redis always, RabbitMQ when RUNCTX_TEST_AMQP_URL names one.
BROKERS = ["redis"] + (["amqp"] if os.environ.get("RUNCTX_TEST_AMQP_URL") else [])


def broker_url_for(servers: Servers, broker: str) -> str:
    """The Celery broker URL of ``broker`` ("redis": the test Redis, "amqp": RUNCTX_TEST_AMQP_URL)."""
    from runctx.embedded import celery_broker_url

    if broker == "amqp":
        return os.environ["RUNCTX_TEST_AMQP_URL"]
    return celery_broker_url(servers.redis_url)


def database_url_for(admin_url: str, dbname: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(admin_url).set(database=dbname).render_as_string(hide_password=False)


def admin_execute(admin_url: str, sql: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql)


def create_database(servers: Servers, template: str, prefix: str = "runctx_t_") -> tuple[str, str]:
    """A new database copied from ``template`` (the migrated one): its name and URL."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    admin_execute(servers.database_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name, database_url_for(servers.database_url, name)


def drop_database(servers: Servers, name: str) -> None:
    admin_execute(servers.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def remove_data_dir(data_dir: Path) -> None:
    """A throwaway data dir and, as root, the PostgreSQL cluster kept for it under /var/lib/runctx."""
    from runctx.embedded import layout as sup

    pg_base = sup.Layout(data_dir.resolve()).pg_base
    if sup.ROOT_PG_BASE in pg_base.parents:
        shutil.rmtree(pg_base, ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
