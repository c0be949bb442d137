"""L3's routine definitions (a version per distinct content) and configurations (`L3Configs`)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, select, text
from sqlalchemy.dialects.postgresql import insert

from state.errors import VersionConflict
from state.keys import config_key, routine_key
from state.schema import configurations, routines
from state.tiers.data import ConfigEntry
from state.tiers.postgres.database import PostgresDatabase


class PostgresConfigs(PostgresDatabase):
    """Definitions and configurations: a stored routine version never changes; a configuration is
    replaced by compare-and-set when a version is expected."""

    def get_config(self, kind: str, name: str) -> ConfigEntry | None:
        table = configurations
        row = self.read(
            lambda conn: conn.execute(
                select(table.c.version, table.c.data).where(table.c.kind == kind, table.c.name == name)
            ).first()
        )
        return None if row is None else ConfigEntry(key=config_key(kind, name), version=row.version, data=row.data)

    def put_config(self, kind: str, name: str, data: Any, *, expected_version: int | None = None) -> int:
        """Create or replace a configuration; returns its new version. CAS when ``expected_version`` is given."""
        table = configurations

        def work(conn: Connection) -> int:
            current = conn.execute(
                select(table.c.version).where(table.c.kind == kind, table.c.name == name).with_for_update()
            ).scalar()
            if expected_version is not None and (current or 0) != expected_version:
                raise VersionConflict("L3", f"configurations/{kind}/{name}", expected_version, current)
            new_version = (current or 0) + 1
            statement = insert(table).values(kind=kind, name=name, version=new_version, data=data)
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[table.c.kind, table.c.name],
                    set_={"version": new_version, "data": statement.excluded.data, "updated_at": text("now()")},
                )
            )
            return new_version

        return self.run(f"put config {kind}/{name}", work)

    def get_routine(self, name: str, version: int | None = None) -> ConfigEntry | None:
        """A routine definition: the given version, or the newest."""
        query = select(routines.c.version, routines.c.definition).where(routines.c.name == name)
        query = query.where(routines.c.version == version) if version is not None else query
        row = self.read(lambda conn: conn.execute(query.order_by(routines.c.version.desc()).limit(1)).first())
        if row is None:
            return None
        return ConfigEntry(key=routine_key(name, version), version=row.version, data=row.definition)

    def put_routine(self, name: str, definition: Any) -> int:
        """Store a new version of a routine definition; returns the version."""

        def work(conn: Connection) -> int:
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": f"routine:{name}"})
            same = conn.execute(  # a version is its content: the same definition is the same version
                select(routines.c.version).where(
                    routines.c.name == name,
                    routines.c.content_hash == text("encode(sha256(convert_to(CAST(:definition AS jsonb)::text, 'UTF8')), 'hex')"),
                ).order_by(routines.c.version.desc()).limit(1),
                {"definition": json.dumps(definition)},
            ).scalar()
            if same is not None:
                return int(same)
            latest = conn.execute(select(routines.c.version).where(routines.c.name == name).order_by(routines.c.version.desc()).limit(1)).scalar()
            version = (latest or 0) + 1
            conn.execute(insert(routines).values(name=name, version=version, definition=definition))
            return version

        return self.run(f"put routine {name}", work)
