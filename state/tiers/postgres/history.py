"""L3's run history (`L3History`): entries inserted many in one statement, inside the transaction
of whatever brings them (a snapshot write, a context's creation, a run's finish), each stored once
however often it is written (a flush made again)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from sqlalchemy import Connection, func, select, text

from state.history import HistoryEntry, created_entry
from state.models import RunContext
from state.schema import step_history
from state.tiers.postgres.database import PostgresDatabase

_INSERT = text(
    f"INSERT INTO {step_history.name} (entry_id, run_id, context_id, epoch, version, step_id, kind, at, entry) "
    "SELECT i, r, c, e, v, s, k, a, d::jsonb FROM unnest(CAST(:ids AS text[]), CAST(:runs AS text[]), "
    "CAST(:contexts AS text[]), CAST(:epochs AS bigint[]), CAST(:versions AS bigint[]), CAST(:steps AS text[]), "
    "CAST(:kinds AS text[]), CAST(:ats AS double precision[]), CAST(:entries AS text[])) "
    "AS t(i, r, c, e, v, s, k, a, d) ON CONFLICT (entry_id) DO NOTHING"
)


class PostgresHistory(PostgresDatabase):
    """The step_history table. Promises: an entry is stored once, whatever how often it is written."""

    def _insert_history(self, conn: Connection, entries: Sequence[HistoryEntry]) -> None:
        """Insert entries inside the caller's transaction: one statement, whatever their count."""
        if not entries:
            return
        conn.execute(_INSERT, {
            "ids": [e.id for e in entries], "runs": [e.run_id for e in entries],
            "contexts": [e.context_id for e in entries], "epochs": [e.epoch for e in entries],
            "versions": [e.version for e in entries], "steps": [e.step_id for e in entries],
            "kinds": [e.kind for e in entries], "ats": [e.at for e in entries],
            "entries": [e.to_json() for e in entries],
        })

    def _created(self, contexts: Sequence[RunContext]) -> list[HistoryEntry]:
        if not self.keep_history:
            return []
        now = time.time()
        return [created_entry(ctx, codec=self.codec, now=now) for ctx in contexts]

    def add_history(self, entries: Sequence[HistoryEntry]) -> None:
        self.run(f"record {len(entries)} history entries", lambda conn: self._insert_history(conn, entries))

    def run_history(self, run_id: str, *, after: int = 0, known: frozenset[str] = frozenset()) -> tuple[list[HistoryEntry], int]:
        table = step_history
        since = (table.c.run_id == run_id, table.c.seq > after)
        if known:  # ids first: only the entries the reader does not hold are read whole
            marks = self.read(lambda conn: conn.execute(select(table.c.seq, table.c.entry_id).where(*since)).all())
            mark = max((row.seq for row in marks), default=after)
            wanted = [row.entry_id for row in marks if row.entry_id not in known]
            if not wanted:
                return [], mark
            query = select(table.c.seq, table.c.entry).where(table.c.entry_id.in_(wanted)).order_by(table.c.seq)
        else:
            query = select(table.c.seq, table.c.entry).where(*since).order_by(table.c.seq)
        rows = self.read(lambda conn: conn.execute(query).all())
        entries = [HistoryEntry.from_json(row.entry if isinstance(row.entry, dict) else json.loads(row.entry)) for row in rows]
        return entries, max([row.seq for row in rows] + ([mark] if known else [after]))

    def history_count(self, run_id: str) -> int:
        query = select(func.count()).select_from(step_history).where(step_history.c.run_id == run_id)
        return int(self.read(lambda conn: conn.execute(query).scalar()) or 0)

    def _delete_history(self, conn: Connection, run_ids: list[str]) -> None:
        conn.execute(step_history.delete().where(step_history.c.run_id.in_(run_ids)))
