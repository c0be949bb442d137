"""L3's run ledger (`L3Ledger`): a run is created with its root context, finished with its final
contexts and exports, rewound (its epoch raised) and pruned, each in one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, func, literal, select, text
from sqlalchemy.dialects.postgresql import JSONB, insert

from state.errors import RunExists
from state.models import RunContext
from state.schema import blackboard_entries, context_snapshots, exports, runs
from state.tiers.data import FINAL_STATUSES, ExportRecord, RunRow
from state.tiers.postgres.contexts import PostgresContexts
from state.tiers.postgres import held
from state.tiers.postgres.blobs import PostgresBlobs
from state.tiers.postgres.waits import PostgresWaits


class _AlreadyFinal(Exception):
    """Rolls back a finish that found the run finished already."""


class PostgresLedger(PostgresContexts, PostgresWaits, PostgresBlobs):
    """The runs table, with the contexts and exports a run's creation and finish write with it (and
    the waits, signals and blob references a run's resume and prune change with it)."""

    @property
    def _own(self) -> Any:
        """The runs of this deployment (deployments may share a database)."""
        return runs.c.deployment == self.deployment

    def create_run(self, run: RunRow, root: RunContext) -> None:
        def work(conn: Connection) -> None:
            self._save_context(conn, root, create=True)
            statement = insert(runs).values(
                run_id=run.run_id,
                routine_name=run.routine_name,
                routine_version=run.routine_version,
                root_context_id=run.root_context_id,
                status=run.status,
                meta=run.meta,
                idempotency_key=run.idempotency_key,
                request_digest=run.request_digest,
                deployment=self.deployment,
            )
            if run.idempotency_key is None:
                conn.execute(statement)
                return
            # Two submits with one key at once: the second waits for the first to commit, then
            # inserts nothing and is told which run holds the key (its root context is rolled back).
            if conn.execute(statement.on_conflict_do_nothing(index_elements=[runs.c.deployment, runs.c.idempotency_key]).returning(runs.c.run_id)).first() is None:
                holder = self._run_by_key(conn, run.idempotency_key)
                raise RunExists(run.idempotency_key, holder.run_id if holder else "?", holder.request_digest if holder else None)

        self.run(f"create run {run.run_id}", work)

    def run_by_key(self, key: str) -> RunRow | None:
        return self.read(lambda conn: self._run_by_key(conn, key))

    def _run_by_key(self, conn: Connection, key: str) -> RunRow | None:
        row = conn.execute(select(runs).where(self._own, runs.c.idempotency_key == key)).mappings().first()
        return None if row is None else self._run_of(row)

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
        history: Sequence[str] = (),
    ) -> bool:
        conditions = [runs.c.run_id == run_id, runs.c.status.notin_(FINAL_STATUSES)]
        if epoch is not None:
            conditions.append(runs.c.epoch == epoch)

        def work(conn: Connection) -> None:
            finished = conn.execute(
                runs.update()
                .where(*conditions)
                # What the run was created with (a fork's origin) stays; the finish's keys are added.
                .values(
                    status=status, error=error, meta=runs.c.meta.op("||")(literal(meta, type_=JSONB)),
                    finished_at=text("now()"), updated_at=text("now()"),
                )
                .returning(runs.c.run_id)
            ).first()
            if finished is None:
                raise _AlreadyFinal()
            for ctx in contexts:
                self._save_context(conn, ctx)
            for record in exports:
                self._write_export(conn, record)
            self._insert_history(conn, history)

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
        row = self.read(lambda conn: conn.execute(select(runs).where(self._own, runs.c.run_id == run_id)).mappings().first())
        return None if row is None else self._run_of(row)

    def list_runs(self, *, status: str | None = None, routine: str | None = None, limit: int = 50) -> list[RunRow]:
        # A list shows how many steps each run has, not their records (a long run's are megabytes).
        brief = (runs.c.meta.op("-")("steps")).op("||")(
            func.jsonb_build_object("step_count", func.coalesce(func.jsonb_array_length(runs.c.meta["steps"]), 0))
        ).label("meta")
        query = select(*[column for column in runs.c if column.name != "meta"], brief).where(self._own)
        if status is not None:
            query = query.where(runs.c.status == status)
        if routine is not None:
            query = query.where(runs.c.routine_name == routine)
        query = query.order_by(runs.c.created_at.desc(), runs.c.run_id).limit(limit)
        return [self._run_of(row) for row in self.read(lambda conn: conn.execute(query).mappings().all())]

    def running_runs(self, limit: int = 1000) -> list[RunRow]:
        query = select(runs).where(self._own, runs.c.status.notin_(FINAL_STATUSES)).order_by(runs.c.updated_at).limit(limit)
        return [self._run_of(row) for row in self.read(lambda conn: conn.execute(query).mappings().all())]

    def reopen_run(self, run_id: str) -> RunRow | None:
        def work(conn: Connection) -> Any:
            row = conn.execute(
                runs.update()
                .where(runs.c.run_id == run_id, runs.c.status.in_(("failed", "cancelled")))
                .values(status="running", error=None, finished_at=None, updated_at=text("now()"))
                .returning(*runs.c)
            ).mappings().first()
            if row is not None:
                self._reopen_waits(conn, run_id)
            return row

        row = self.run(f"reopen run {run_id}", work)
        return None if row is None else self._run_of(row)

    def begin_rewind(self, run_id: str, from_epoch: int) -> int | None:
        def work(conn: Connection) -> int | None:
            return conn.execute(
                runs.update()
                .where(runs.c.run_id == run_id, runs.c.epoch == from_epoch, runs.c.status.notin_(FINAL_STATUSES))
                .values(epoch=runs.c.epoch + 1, updated_at=text("now()"))
                .returning(runs.c.epoch)
            ).scalar()

        return self.run(f"rewind run {run_id}", work)

    def prune_runs(self, older_than_s: float, *, limit: int = 500) -> dict[str, list[str]]:
        # The database's clock decides what is old: every node agrees whatever its own clock says.
        doomed = (
            select(runs.c.run_id)
            .where(
                self._own,
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
            held.delete_values(conn, run_ids)
            self._delete_history(conn, run_ids)
            self._delete_waits(conn, run_ids)
            self._release_blobs(conn, run_ids)
            conn.execute(runs.delete().where(runs.c.run_id.in_(run_ids)))
            return pruned

        return self.run("prune finished runs", work)

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
            idempotency_key=row.get("idempotency_key"),
            request_digest=row.get("request_digest"),
        )
