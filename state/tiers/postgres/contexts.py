"""L3's context snapshots (`L3Contexts`): written in one transaction, only if newer (the write-behind
rule: a writer from before a rewind never replaces the new lineage)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert

from state.errors import ContextCorruption, VersionConflict
from state.models import RunContext
from state.schema import context_snapshots
from state.tiers.postgres import held
from state.tiers.postgres.history import PostgresHistory

_CREATE_MANY = text(
    f"INSERT INTO {context_snapshots.name} (context_id, run_id, parent_id, version, epoch, document) "
    "SELECT c, r, p, v, e, d::jsonb FROM unnest(CAST(:ids AS text[]), CAST(:runs AS text[]), CAST(:parents AS text[]), "
    "CAST(:versions AS bigint[]), CAST(:epochs AS bigint[]), CAST(:documents AS text[])) AS t(c, r, p, v, e, d) "
    "ON CONFLICT (context_id) DO NOTHING RETURNING context_id"
)


class PostgresContexts(PostgresHistory):
    """Context snapshots: a create refuses an existing id (and records the creation in the history);
    a write is "only if newer", with the history entries that came with it. A snapshot's large
    plain values are held beside it once per run (`held`): a write sends those L3 lacks."""

    def get_context(self, context_id: str) -> RunContext | None:
        """The stored snapshot, at the row's version (a plain-SQL edit raises that, not the document's)."""
        table = context_snapshots
        query = select(table.c.run_id, table.c.version, table.c.epoch, table.c.document).where(table.c.context_id == context_id)
        found = self.read(lambda conn: self._contexts_of(conn, conn.execute(query).all()))
        return found[0] if found else None

    def _contexts_of(self, conn: Connection, rows: Sequence[Any]) -> list[RunContext]:
        """The rows' contexts, their held values read in one query."""
        wanted = set().union(*(held.digests_in(row.document) for row in rows)) if rows else set()
        values = held.fetch_values(conn, {row.run_id for row in rows}, wanted)
        return [self._context_of(row, values) for row in rows]

    def _context_of(self, row: Any, values: dict[str, Any]) -> RunContext:
        where = f"L3 context {row.document.get('context_id', '?')}"
        if not held.digests_in(row.document) <= values.keys():
            raise ContextCorruption(where, "a large value its snapshot names is not held")
        ctx = self.codec.from_document(held.joined(row.document, values), key=where)
        ctx.version, ctx.epoch = row.version, row.epoch
        return ctx

    def _document(self, conn: Connection, ctx: RunContext) -> dict[str, Any]:
        """The snapshot's document, its large values stored (those L3 lacks) inside the caller's transaction."""
        document, values = held.split(self.codec.to_document(ctx))
        held.store_values(conn, ctx.run_id, values)
        return document

    def context_version(self, context_id: str) -> int | None:
        return self.read(
            lambda conn: conn.execute(
                select(context_snapshots.c.version).where(context_snapshots.c.context_id == context_id)
            ).scalar()
        )

    def create_context(self, ctx: RunContext) -> None:
        self.run(f"create context {ctx.context_id}", lambda conn: self._save_context(conn, ctx, create=True))

    def create_contexts(self, contexts: list[RunContext]) -> int:
        """Insert new contexts in one statement (columns as arrays, unnested by the server: one
        round trip, whatever the count), leaving those that exist already; how many were new."""

        def work(conn: Connection) -> int:
            columns = {
                "ids": [ctx.context_id for ctx in contexts],
                "runs": [ctx.run_id for ctx in contexts],
                "parents": [ctx.parent_id for ctx in contexts],
                "versions": [ctx.version for ctx in contexts],
                "epochs": [ctx.epoch for ctx in contexts],
                "documents": [json.dumps(self._document(conn, ctx)) for ctx in contexts],
            }
            created = set(conn.execute(_CREATE_MANY, columns).scalars())
            self._insert_history(conn, self._created(conn, [ctx for ctx in contexts if ctx.context_id in created]))
            return len(created)

        return self.run(f"create {len(contexts)} contexts", work)

    def write_context(self, ctx: RunContext) -> bool:
        return self.run(f"flush context {ctx.context_id}", lambda conn: self._save_context(conn, ctx))

    def write_contexts(self, contexts: list[RunContext], history: Sequence[str] = ()) -> int:
        def work(conn: Connection) -> int:
            written = sum(self._save_context(conn, ctx) for ctx in contexts)
            self._insert_history(conn, history)
            return written

        what = f"context {contexts[0].context_id}" if len(contexts) == 1 else f"{len(contexts)} contexts"
        return self.run(f"flush {what}", work)

    def _save_context(self, conn: Connection, ctx: RunContext, *, create: bool = False) -> bool:
        """Write a snapshot inside the caller's transaction.

        ``create``: the context must not exist yet (VersionConflict if it does). Otherwise the write
        happens only if (epoch, version) is newer than what L3 holds (the write-behind rule: a writer
        from before a rewind never replaces the new lineage); returns whether it was written.
        """
        values = {
            "context_id": ctx.context_id,
            "run_id": ctx.run_id,
            "parent_id": ctx.parent_id,
            "version": ctx.version,
            "epoch": ctx.epoch,
            "document": self._document(conn, ctx),
        }
        table = context_snapshots
        if create:
            statement = insert(table).values(**values).on_conflict_do_nothing().returning(table.c.version)
            if conn.execute(statement).first() is None:
                actual = conn.execute(select(table.c.version).where(table.c.context_id == ctx.context_id)).scalar()
                raise VersionConflict("L3", f"context_snapshots/{ctx.context_id}", 0, actual)
            self._insert_history(conn, self._created(conn, [ctx]))
            return True
        statement = insert(table).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.context_id],
            set_={
                "version": statement.excluded.version,
                "epoch": statement.excluded.epoch,
                "document": statement.excluded.document,
                "updated_at": text("now()"),
            },
            where=tuple_(table.c.epoch, table.c.version) < tuple_(statement.excluded.epoch, statement.excluded.version),
        )
        # RETURNING, not rowcount: SQLAlchemy reports no rowcount for INSERT.
        return conn.execute(statement.returning(table.c.version)).first() is not None

    def run_contexts(self, run_id: str) -> list[RunContext]:
        table = context_snapshots
        query = select(table.c.run_id, table.c.version, table.c.epoch, table.c.document).where(table.c.run_id == run_id)
        return self.read(lambda conn: self._contexts_of(conn, conn.execute(query).all()))

    def discard_context(self, context_id: str) -> None:
        self.run(
            f"discard context {context_id}",
            lambda conn: conn.execute(context_snapshots.delete().where(context_snapshots.c.context_id == context_id)),
        )
