"""The in-memory twin of L3's blobs (`state.tiers.postgres.blobs`), under the L3 twin's lock."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from state.tiers.data import NewBlob


class MemoryBlobs:
    """Blobs by id and the runs that hold each. Promises what `PostgresBlobs` promises."""

    _lock: threading.RLock
    writes: int

    def _init_blobs(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._sizes: dict[str, int] = {}
        self._blob_refs: set[tuple[str, str]] = set()  # (run id, blob id)

    def put_blobs(self, run_id: str, blobs: Sequence[NewBlob]) -> int:
        with self._lock:
            new = 0
            for blob in blobs:
                new += blob.blob_id not in self._blobs
                self._blobs.setdefault(blob.blob_id, bytes(blob.data))
                self._sizes.setdefault(blob.blob_id, blob.size)
                self._blob_refs.add((run_id, blob.blob_id))
            self.writes += 1
            return new

    def get_blob(self, blob_id: str) -> bytes | None:
        with self._lock:
            return self._blobs.get(blob_id)

    def hold_blobs(self, run_id: str, blob_ids: Iterable[str]) -> None:
        with self._lock:
            self._blob_refs |= {(run_id, blob_id) for blob_id in blob_ids}

    def known_blobs(self, blob_ids: Iterable[str]) -> set[str]:
        with self._lock:
            return {blob_id for blob_id in blob_ids if blob_id in self._blobs}

    def blob_usage(self) -> tuple[int, int]:
        with self._lock:
            return len(self._blobs), sum(self._sizes.values())

    def _release_blobs(self, run_ids: set[str]) -> None:
        released = {blob_id for run_id, blob_id in self._blob_refs if run_id in run_ids}
        self._blob_refs = {ref for ref in self._blob_refs if ref[0] not in run_ids}
        held = {blob_id for _, blob_id in self._blob_refs}
        for blob_id in released - held:
            self._blobs.pop(blob_id, None)
            self._sizes.pop(blob_id, None)
