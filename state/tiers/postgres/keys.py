"""L3's record of the keys values are sealed under, and sealing again under the newest (`L3Keys`)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Text, func, literal, or_, select
from sqlalchemy import cast as sa_cast
from sqlalchemy.dialects.postgresql import insert

from state.history import HistoryEntry, resealed
from state.schema import blackboard_entries, blobs, context_snapshots, encryption_keys, exports, run_signals, step_history
from state.tiers.postgres.contexts import PostgresContexts


class PostgresKeys(PostgresContexts):
    """The keys in use; a rotation seals rows again in batches, versions unchanged."""

    def reseal(self, old_key_ids: set[str], *, limit: int = 100) -> int:
        """Seal again, under the newest key, up to ``limit`` contexts, history entries, exports and signals that hold values
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
                select(table.c.context_id, table.c.run_id, table.c.version, table.c.epoch, table.c.document)
                .where(holding(table.c.document)).limit(limit).with_for_update(skip_locked=True)
            ).all()
            for row, ctx in zip(rows, self._contexts_of(conn, rows)):
                conn.execute(table.update().where(table.c.context_id == row.context_id).values(document=self._document(conn, ctx)))
                done += 1
            history = step_history
            found = conn.execute(
                select(history.c.entry_id, history.c.entry).where(holding(history.c.entry)).limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            for entry_id, raw in found:
                entry = resealed(HistoryEntry.from_json(raw), self.codec)
                conn.execute(history.update().where(history.c.entry_id == entry_id).values(entry=json.loads(entry.to_json())))
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
            signals = run_signals
            found = conn.execute(
                select(signals.c.run_id, signals.c.event, signals.c.sensitivity, signals.c.payload)
                .where(holding(signals.c.payload)).limit(limit).with_for_update(skip_locked=True)
            ).all()
            for run_id, event, sensitivity, payload in found:
                value = self.codec.open_signal(run_id, event, sensitivity, payload)
                conn.execute(
                    signals.update().where(signals.c.run_id == run_id, signals.c.event == event)
                    .values(payload=self.codec.signal_value(run_id, event, sensitivity, value))
                )
                done += 1
            sealed_blobs = conn.execute(
                select(blobs.c.blob_id, blobs.c.data)
                .where(or_(*(func.position(literal(marker.encode()).op("IN")(blobs.c.data)) > 0 for marker in markers)))
                .limit(limit).with_for_update(skip_locked=True)
            ).all()
            for blob_id, data in sealed_blobs:
                value = self.codec.open_blob(blob_id, bytes(data))
                fresh = self.codec.blob_data(blob_id, "secret", value, b"")
                conn.execute(blobs.update().where(blobs.c.blob_id == blob_id).values(data=fresh))
                done += 1
            return done

        return self.run("reseal", work)

    def forget_keys(self, key_ids: set[str]) -> None:
        self.run("forget keys", lambda conn: conn.execute(encryption_keys.delete().where(encryption_keys.c.key_id.in_(sorted(key_ids)))))

    def record_key(self, key_id: str) -> None:
        self.run("record key", lambda conn: conn.execute(insert(encryption_keys).values(key_id=key_id).on_conflict_do_nothing()))

    def key_ids(self) -> set[str]:
        return set(self.read(lambda conn: conn.execute(select(encryption_keys.c.key_id)).scalars().all()))
