"""Alembic environment: runs the migrations against the URL runctx passes in."""

from alembic import context
from sqlalchemy import create_engine, pool, text

from state.schema import metadata

url = context.config.get_main_option("sqlalchemy.url")


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            # Workers starting together all migrate: one at a time, the others then find it done.
            connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('runctx-migrations'))"))
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
