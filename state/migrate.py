"""Bring an L3 database to the newest schema with Alembic."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from state.errors import CommunicationFailure

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate to ``revision``; a database that cannot be reached raises CommunicationFailure."""
    from sqlalchemy.exc import OperationalError

    try:
        command.upgrade(alembic_config(database_url), revision)
    except OperationalError as exc:
        reason = (str(exc.orig or exc).strip().splitlines() or ["cannot connect"])[0]
        raise CommunicationFailure("L3 (PostgreSQL)", reason) from None


def schema_problem(database_url: str) -> str | None:
    """Why the database's schema is not the newest this code knows (None: it is)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    return None if current == head else f"the schema is at revision {current}, this code needs {head} (runctx migrate)"
