"""L3's blobs (`L3Blobs`): values stored once by reference, and which runs hold each."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import Connection, exists, func, select
from sqlalchemy.dialects.postgresql import insert

from state.schema import blob_refs, blobs
from state.tiers.data import NewBlob
from state.tiers.postgres.database import PostgresDatabase


class PostgresBlobs(PostgresDatabase):
    """The blobs and blob_refs tables. Promises: a blob is stored once whoever stores it again; a
    blob no kept run holds goes with the last run that held it (`_release_blobs`, in prune)."""

    def put_blobs(self, run_id: str, new: Sequence[NewBlob]) -> int:
        def work(conn: Connection) -> int:
            rows = [{"blob_id": blob.blob_id, "data": blob.data, "size": blob.size} for blob in new]
            stored = conn.execute(insert(blobs).values(rows).on_conflict_do_nothing().returning(blobs.c.blob_id)).all()
            self._hold(conn, run_id, [blob.blob_id for blob in new])
            return len(stored)

        return self.run(f"store {len(new)} blobs for run {run_id}", work) if new else 0

    def get_blob(self, blob_id: str) -> bytes | None:
        row = self.read(lambda conn: conn.execute(select(blobs.c.data).where(blobs.c.blob_id == blob_id)).first())
        return None if row is None else bytes(row.data)

    def hold_blobs(self, run_id: str, blob_ids: Iterable[str]) -> None:
        wanted = sorted(set(blob_ids))
        if wanted:
            self.run(f"hold blobs for run {run_id}", lambda conn: self._hold(conn, run_id, wanted))

    def known_blobs(self, blob_ids: Iterable[str]) -> set[str]:
        wanted = sorted(set(blob_ids))
        if not wanted:
            return set()
        return set(self.read(lambda conn: conn.execute(select(blobs.c.blob_id).where(blobs.c.blob_id.in_(wanted))).scalars().all()))

    def blob_usage(self) -> tuple[int, int]:
        row = self.read(lambda conn: conn.execute(select(func.count(), func.coalesce(func.sum(blobs.c.size), 0))).first())
        return int(row[0]), int(row[1])

    def _hold(self, conn: Connection, run_id: str, blob_ids: list[str]) -> None:
        conn.execute(insert(blob_refs).values([{"run_id": run_id, "blob_id": b} for b in blob_ids]).on_conflict_do_nothing())

    def _release_blobs(self, conn: Connection, run_ids: list[str]) -> None:
        """Inside a prune: the runs let go of their blobs; a blob no other run holds is deleted."""
        released = conn.execute(blob_refs.delete().where(blob_refs.c.run_id.in_(run_ids)).returning(blob_refs.c.blob_id)).scalars().all()
        if released:
            held = exists().where(blob_refs.c.blob_id == blobs.c.blob_id)
            conn.execute(blobs.delete().where(blobs.c.blob_id.in_(sorted(set(released))), ~held))
