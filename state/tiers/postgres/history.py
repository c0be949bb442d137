"""L3's run history (`L3History`): entries inserted many in one statement, inside the transaction
of whatever brings them (a snapshot write, a context's creation, a run's finish), each stored once
however often it is written (a flush made again)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, func, select, text

from state.detached import digest
from state.errors import ContextCorruption
from state.history import Change, HistoryEntry, created_entry
from state.models import RunContext
from state.schema import step_history
from state.tiers.postgres import held
from state.tiers.postgres.database import PostgresDatabase

# The entries as they come (JSON text): the columns are read out of them by the server, so that the
# writer, a worker process, neither parses nor encodes them again.
_INSERT = text(
    f"INSERT INTO {step_history.name} (entry_id, run_id, context_id, epoch, version, step_id, kind, at, entry) "
    "SELECT d->>'id', d->>'run_id', d->>'context_id', (d->>'epoch')::bigint, (d->>'version')::bigint, d->>'step_id', "
    "d->>'kind', (d->>'at')::double precision, d FROM unnest(CAST(:entries AS jsonb[])) AS t(d) "
    "ON CONFLICT (entry_id) DO NOTHING"
)


class PostgresHistory(PostgresDatabase):
    """The step_history table. Promises: an entry is stored once, whatever how often it is written."""

    def _insert_history(self, conn: Connection, entries: Sequence[str]) -> None:
        """Insert entries (as JSON) inside the caller's transaction: one statement, whatever their count."""
        if entries:
            conn.execute(_INSERT, {"entries": list(entries)})

    def _created(self, conn: Connection, contexts: Sequence[RunContext]) -> list[str]:
        """The contexts' creation entries, their large plain values held beside them (stored once
        for the run with the snapshot's: `held`), inside the caller's transaction."""
        if not self.keep_history:
            return []
        now = time.time()
        entries = []
        for ctx in contexts:
            entry = created_entry(ctx, codec=self.codec, now=now)
            values: dict[str, str] = {}
            changes = tuple(self._held_change(change, values) for change in entry.changes)
            held.store_values(conn, ctx.run_id, values)
            entries.append(dataclasses.replace(entry, changes=changes).to_json())
        return entries

    @staticmethod
    def _held_change(change: Change, values: dict[str, str]) -> Change:
        encoded = None if change.op != "set" or change.masked else held.large_text(change.value)
        if encoded is None:
            return change
        key = digest(encoded.encode())
        values[key] = encoded
        return dataclasses.replace(change, value=None, held=key)

    def _opened_entries(self, conn: Connection, run_id: str, entries: list[HistoryEntry]) -> list[HistoryEntry]:
        """The entries with the values they hold beside them read back."""
        wanted = {change.held for entry in entries for change in entry.changes if change.held}
        if not wanted:
            return entries
        values = held.fetch_values(conn, {run_id}, wanted)
        missing = wanted - values.keys()
        if missing:
            raise ContextCorruption(f"history of run {run_id}", "a large value an entry names is not held")
        return [
            dataclasses.replace(entry, changes=tuple(
                dataclasses.replace(change, value=values[change.held], held="") if change.held else change for change in entry.changes
            )) if any(change.held for change in entry.changes) else entry
            for entry in entries
        ]

    def add_history(self, entries: Sequence[HistoryEntry]) -> None:
        raws = [entry.to_json() for entry in entries]
        self.run(f"record {len(entries)} history entries", lambda conn: self._insert_history(conn, raws))

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
        def work(conn: Connection) -> tuple[list[Any], list[HistoryEntry]]:
            rows = conn.execute(query).all()
            entries = [HistoryEntry.from_json(row.entry if isinstance(row.entry, dict) else json.loads(row.entry)) for row in rows]
            return rows, self._opened_entries(conn, run_id, entries)

        rows, entries = self.read(work)
        return entries, max([row.seq for row in rows] + ([mark] if known else [after]))

    def history_count(self, run_id: str) -> int:
        query = select(func.count()).select_from(step_history).where(step_history.c.run_id == run_id)
        return int(self.read(lambda conn: conn.execute(query).scalar()) or 0)

    def _delete_history(self, conn: Connection, run_ids: list[str]) -> None:
        conn.execute(step_history.delete().where(step_history.c.run_id.in_(run_ids)))
