"""L3 on PostgreSQL, the authoritative record (SQLAlchemy 2 Core over psycopg 3).

Every write runs in one transaction as the role ``runctx_writer`` (migration 0006; only its members
may take it, so change-event listeners can tell runctx's writes from plain SQL and a plain-SQL
session cannot pass for runctx), with optimistic locking on versions and
retries with backoff for transient failures. This module and `state/schema.py` are the only
places that speak SQL to the tables.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Text,
    create_engine,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy import cast as sa_cast
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from state.codec import DEFAULT_CODEC, Codec
from state.errors import (
    CommunicationFailure,
    RefusedByDatabase,
    TransactionFailed,
    VersionConflict,
)
from state.keys import config_key, routine_key
from state.models import RunContext, StateCacheConfig
from state.schema import (
    blackboard_entries,
    configurations,
    context_snapshots,
    encryption_keys,
    exports,
    routines,
    runs,
)
from state.tiers.contracts import FINAL_STATUSES, ConfigEntry, ExportRecord, RunRow

log = logging.getLogger(__name__)

WRITER_ROLE = "runctx_writer"  # migration 0006: the role runctx's own transactions run as
T = TypeVar("T")

# SQLSTATEs worth another try: serialization failure, deadlock, lock timeout.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03"}


def _is_transient(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in _TRANSIENT_SQLSTATES


def _refused(operation: str, exc: DBAPIError) -> RefusedByDatabase:
    """A permanent database error as a runctx error, without the statement's parameters or data."""
    diag = getattr(exc.orig, "diag", None)
    reason = getattr(diag, "message_primary", None) or type(exc.orig).__name__
    return RefusedByDatabase(operation, getattr(exc.orig, "sqlstate", None), reason)


def _reason(exc: DBAPIError) -> str:
    """What went wrong, without DETAIL or CONTEXT (PostgreSQL quotes the offending data there)."""
    diag = getattr(exc.orig, "diag", None)
    primary = getattr(diag, "message_primary", None) or type(exc.orig).__name__
    return f"{primary} [{getattr(exc.orig, 'sqlstate', None) or '-'}]"


def _is_connection_error(exc: DBAPIError) -> bool:
    return isinstance(exc, (OperationalError, InterfaceError)) and (
        exc.connection_invalidated or getattr(exc.orig, "sqlstate", None) in (None, "08000", "08001", "08006", "57P01")
    )


class _AlreadyFinal(Exception):
    """Rolls back a finish that found the run finished already."""


class PostgresTier:
    """L3 on one PostgreSQL database: owns the runctx tables (their schema is in `state.schema`).

    Promises: every operation is one transaction (all or nothing); a context write is a
    compare-and-set or "only if newer", never a lost update; transient failures are retried with
    backoff, and what still fails leaves as TransactionFailed or CommunicationFailure.
    """

    def __init__(self, engine: Engine, *, config: StateCacheConfig, codec: Codec = DEFAULT_CODEC) -> None:
        self.engine = engine
        self._as_writer: bool | None = None  # whether transactions run as WRITER_ROLE (found out once)
        self.codec = codec
        self.retry_attempts = config.l3_retry_attempts
        self.retry_base_delay_s = config.l3_retry_base_delay_s

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> PostgresTier:
        # hide_parameters: an error never carries the values it was about to write.
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, hide_parameters=True)
        return cls(engine, **kwargs)

    def close(self) -> None:
        self.engine.dispose()

    # ---- transactions --------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One L3 transaction, marked as runctx's own: run as the role runctx_writer (which only
        its members may take), or, where there is no such role, by the runctx.origin setting."""
        with self.engine.begin() as conn:
            if self._as_writer is None:
                self._as_writer = bool(
                    conn.execute(
                        text("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = :role) AND pg_has_role(:role, 'MEMBER')"),
                        {"role": WRITER_ROLE},
                    ).scalar()
                )
            if self._as_writer:
                conn.execute(text(f"SET LOCAL ROLE {WRITER_ROLE}"))
            else:
                conn.execute(text("SELECT set_config('runctx.origin', 'runctx', true)"))
            yield conn

    def run(self, operation: str, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a transaction, retrying transient failures with exponential backoff."""
        for attempt in range(1, self.retry_attempts + 1):
            try:
                with self.transaction() as conn:
                    return work(conn)
            except DBAPIError as exc:
                retryable = _is_transient(exc) or _is_connection_error(exc)
                if not retryable:
                    raise _refused(operation, exc) from None
                if attempt == self.retry_attempts:
                    if _is_connection_error(exc):
                        raise CommunicationFailure("L3 (PostgreSQL)", _reason(exc)) from None
                    raise TransactionFailed(operation, attempt, RuntimeError(_reason(exc))) from None
                delay = self.retry_base_delay_s * (2 ** (attempt - 1)) * (1 + random.random())
                log.warning("L3 %s failed (attempt %d), retrying in %.2fs: %s", operation, attempt, delay, _reason(exc))
                time.sleep(delay)
        raise AssertionError("unreachable")

    def read(self, work: Callable[[Connection], T]) -> T:
        try:
            with self.engine.connect() as conn:
                return work(conn)
        except DBAPIError as exc:
            if _is_connection_error(exc):
                raise CommunicationFailure("L3 (PostgreSQL)", _reason(exc)) from None
            raise _refused("L3 read", exc) from None

    # ---- contexts ------------------------------------------------------------------------

    def get_context(self, context_id: str) -> RunContext | None:
        """The stored snapshot, at the row's version (a plain-SQL edit raises that, not the document's)."""
        table = context_snapshots
        row = self.read(
            lambda conn: conn.execute(
                select(table.c.version, table.c.epoch, table.c.document).where(table.c.context_id == context_id)
            ).first()
        )
        return None if row is None else self._context_of(row)

    def _context_of(self, row: Any) -> RunContext:
        ctx = self.codec.from_document(row.document, key=f"L3 context {row.document.get('context_id', '?')}")
        ctx.version, ctx.epoch = row.version, row.epoch
        return ctx

    def context_version(self, context_id: str) -> int | None:
        return self.read(
            lambda conn: conn.execute(
                select(context_snapshots.c.version).where(context_snapshots.c.context_id == context_id)
            ).scalar()
        )

    def create_context(self, ctx: RunContext) -> None:
        self.run(f"create context {ctx.context_id}", lambda conn: self._save_context(conn, ctx, create=True))

    def write_context(self, ctx: RunContext) -> bool:
        return self.run(f"flush context {ctx.context_id}", lambda conn: self._save_context(conn, ctx))

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
            "document": self.codec.to_document(ctx),
        }
        table = context_snapshots
        if create:
            statement = insert(table).values(**values).on_conflict_do_nothing().returning(table.c.version)
            if conn.execute(statement).first() is None:
                actual = conn.execute(select(table.c.version).where(table.c.context_id == ctx.context_id)).scalar()
                raise VersionConflict("L3", f"context_snapshots/{ctx.context_id}", 0, actual)
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

    # ---- routine definitions and configurations ---------------------------------------------

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

    # ---- the run ledger ----------------------------------------------------------------------

    def create_run(self, run: RunRow, root: RunContext) -> None:
        def work(conn: Connection) -> None:
            self._save_context(conn, root, create=True)
            conn.execute(
                insert(runs).values(
                    run_id=run.run_id,
                    routine_name=run.routine_name,
                    routine_version=run.routine_version,
                    root_context_id=run.root_context_id,
                    status=run.status,
                    meta=run.meta,
                )
            )

        self.run(f"create run {run.run_id}", work)

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        error: str | None,
        meta: dict[str, Any],
        contexts: list[RunContext],
        exports: list[ExportRecord],
        epoch: int | None = None,
    ) -> bool:
        conditions = [runs.c.run_id == run_id, runs.c.status.notin_(FINAL_STATUSES)]
        if epoch is not None:
            conditions.append(runs.c.epoch == epoch)

        def work(conn: Connection) -> None:
            finished = conn.execute(
                runs.update()
                .where(*conditions)
                .values(status=status, error=error, meta=meta, finished_at=text("now()"), updated_at=text("now()"))
                .returning(runs.c.run_id)
            ).first()
            if finished is None:
                raise _AlreadyFinal()
            for ctx in contexts:
                self._save_context(conn, ctx)
            for record in exports:
                self._write_export(conn, record)

        try:
            self.run(f"finish run {run_id}", work)
        except _AlreadyFinal:
            return False
        return True

    def _write_export(self, conn: Connection, record: ExportRecord) -> None:
        value = self.codec.export_value(
            record.run_id, record.destination, record.scope, record.key, record.variable, record.sensitivity, record.value
        )
        if record.destination == "blackboard":
            statement = insert(blackboard_entries).values(
                scope=record.scope, key=record.key, value=value, sensitivity=record.sensitivity,
                run_id=record.run_id, version=1,
            )
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[blackboard_entries.c.scope, blackboard_entries.c.key],
                    set_={
                        "value": statement.excluded.value,
                        "sensitivity": statement.excluded.sensitivity,
                        "run_id": statement.excluded.run_id,
                        "version": blackboard_entries.c.version + 1,
                        "updated_at": text("now()"),
                    },
                )
            )
        else:
            statement = insert(exports).values(
                run_id=record.run_id, variable=record.variable, key=record.key,
                scope=record.scope, value=value, sensitivity=record.sensitivity,
            )
            conn.execute(statement.on_conflict_do_nothing())

    def get_run(self, run_id: str) -> RunRow | None:
        row = self.read(lambda conn: conn.execute(select(runs).where(runs.c.run_id == run_id)).mappings().first())
        return None if row is None else self._run_of(row)

    def list_runs(self, *, status: str | None = None, routine: str | None = None, limit: int = 50) -> list[RunRow]:
        query = select(runs)
        if status is not None:
            query = query.where(runs.c.status == status)
        if routine is not None:
            query = query.where(runs.c.routine_name == routine)
        query = query.order_by(runs.c.created_at.desc(), runs.c.run_id).limit(limit)
        return [self._run_of(row) for row in self.read(lambda conn: conn.execute(query).mappings().all())]

    def running_runs(self, limit: int = 1000) -> list[RunRow]:
        query = select(runs).where(runs.c.status.notin_(FINAL_STATUSES)).order_by(runs.c.updated_at).limit(limit)
        return [self._run_of(row) for row in self.read(lambda conn: conn.execute(query).mappings().all())]

    def begin_rewind(self, run_id: str, from_epoch: int) -> int | None:
        def work(conn: Connection) -> int | None:
            return conn.execute(
                runs.update()
                .where(runs.c.run_id == run_id, runs.c.epoch == from_epoch, runs.c.status.notin_(FINAL_STATUSES))
                .values(epoch=runs.c.epoch + 1, updated_at=text("now()"))
                .returning(runs.c.epoch)
            ).scalar()

        return self.run(f"rewind run {run_id}", work)

    def run_contexts(self, run_id: str) -> list[RunContext]:
        table = context_snapshots
        query = select(table.c.version, table.c.epoch, table.c.document).where(table.c.run_id == run_id)
        return [self._context_of(row) for row in self.read(lambda conn: conn.execute(query).all())]

    def prune_runs(self, older_than_s: float, *, limit: int = 500) -> dict[str, list[str]]:
        # The database's clock decides what is old: every node agrees whatever its own clock says.
        doomed = (
            select(runs.c.run_id)
            .where(
                runs.c.status.in_(FINAL_STATUSES),
                runs.c.finished_at < text("now() - make_interval(secs => :age)").bindparams(age=older_than_s),
            )
            .order_by(runs.c.finished_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )

        def work(conn: Connection) -> dict[str, list[str]]:
            run_ids = list(conn.execute(doomed).scalars())
            if not run_ids:
                return {}
            pruned: dict[str, list[str]] = {run_id: [] for run_id in run_ids}
            gone = conn.execute(
                context_snapshots.delete()
                .where(context_snapshots.c.run_id.in_(run_ids))
                .returning(context_snapshots.c.run_id, context_snapshots.c.context_id)
            )
            for run_id, context_id in gone:
                pruned[run_id].append(context_id)
            conn.execute(runs.delete().where(runs.c.run_id.in_(run_ids)))
            return pruned

        return self.run("prune finished runs", work)

    def discard_context(self, context_id: str) -> None:
        self.run(
            f"discard context {context_id}",
            lambda conn: conn.execute(context_snapshots.delete().where(context_snapshots.c.context_id == context_id)),
        )

    def _run_of(self, row: Any) -> RunRow:
        return RunRow(
            run_id=row["run_id"],
            routine_name=row["routine_name"],
            routine_version=row["routine_version"],
            root_context_id=row["root_context_id"],
            status=row["status"],
            error=row["error"],
            meta=dict(row["meta"] or {}),
            created_at=row["created_at"],
            finished_at=row["finished_at"],
            epoch=row["epoch"],
            updated_at=row["updated_at"],
        )

    def reseal(self, old_key_ids: set[str], *, limit: int = 100) -> int:
        """Seal again, under the newest key, up to ``limit`` contexts and exports that hold values
        sealed under ``old_key_ids``; each row in a transaction of its own batch. Returns how many
        were resealed (0: none is left). Versions do not change: only the envelopes do."""
        markers = [f"v1.{key_id}." for key_id in sorted(old_key_ids)]
        if not markers:
            return 0

        def holding(column: Any) -> Any:
            rendered = sa_cast(column, Text)
            return or_(*(rendered.contains(marker) for marker in markers))

        def work(conn: Connection) -> int:
            done = 0
            table = context_snapshots
            rows = conn.execute(
                select(table.c.context_id, table.c.version, table.c.epoch, table.c.document)
                .where(holding(table.c.document)).limit(limit).with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                ctx = self._context_of(row)
                conn.execute(
                    table.update().where(table.c.context_id == row.context_id).values(document=self.codec.to_document(ctx))
                )
                done += 1
            for target in (exports, blackboard_entries):
                found = conn.execute(select(target).where(holding(target.c.value)).limit(limit).with_for_update(skip_locked=True)).mappings().all()
                for item in found:
                    destination = "blackboard" if target is blackboard_entries else "persistent"
                    args = (item["run_id"], destination, item["scope"], item["key"], item.get("variable", ""), item["sensitivity"])
                    value = self.codec.export_value(*args, self.codec.open_export(*args, item["value"]))
                    keys = [target.c[name] == item[name] for name in [col.name for col in target.primary_key.columns]]
                    conn.execute(target.update().where(*keys).values(value=value))
                    done += 1
            return done

        return self.run("reseal", work)

    def forget_keys(self, key_ids: set[str]) -> None:
        self.run("forget keys", lambda conn: conn.execute(encryption_keys.delete().where(encryption_keys.c.key_id.in_(sorted(key_ids)))))

    def record_key(self, key_id: str) -> None:
        self.run("record key", lambda conn: conn.execute(insert(encryption_keys).values(key_id=key_id).on_conflict_do_nothing()))

    def key_ids(self) -> set[str]:
        return set(self.read(lambda conn: conn.execute(select(encryption_keys.c.key_id)).scalars().all()))

    def ping(self) -> bool:
        return self.read(lambda conn: conn.execute(text("SELECT 1")).scalar() == 1)
