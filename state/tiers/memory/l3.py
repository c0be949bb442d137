"""The in-memory twin of the PostgreSQL tier: the same contract in one process, for fast engine tests.

Every operation runs under one lock and either applies whole or raises before changing anything,
as a transaction would. Documents are stored encoded, so a reader gets its own copy.
`tests/state/test_tier_contracts.py` holds it to the behaviour of the SQL it stands in for.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from state.codec import DEFAULT_CODEC, Codec
from state.errors import RefusedByDatabase, RunExists, VersionConflict
from state.history import HistoryEntry, created_entry, resealed
from state.keys import config_key, routine_key
from state.models import RunContext
from state.tiers.data import FINAL_STATUSES, ConfigEntry, ExportRecord, RunRow
from state.tiers.memory.blobs import MemoryBlobs
from state.tiers.memory.waits import MemoryWaits


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _as_jsonb(value: Any) -> Any:
    """A copy of a JSON value as PostgreSQL's JSONB gives it back (an integral 1e16 comes back an integer)."""
    if isinstance(value, float) and value.is_integer() and "e" in repr(value):
        return int(value)
    if isinstance(value, list):
        return [_as_jsonb(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_jsonb(item) for key, item in value.items()}
    return value


def _jsonb_text(operation: str, value: Any) -> str:
    """The JSON text stored for a value, refused as PostgreSQL refuses it (NUL characters)."""
    text = json.dumps(_as_jsonb(value))
    if "\\u0000" in text:
        raise RefusedByDatabase(operation, "22P05", "unsupported Unicode escape sequence")
    return text


def _check_width(operation: str, value: str | None, width: int) -> None:
    if value is not None and len(value) > width:
        raise RefusedByDatabase(operation, "22001", f"value too long for type character varying({width})")


class MemoryL3(MemoryWaits, MemoryBlobs):
    """L3 in one process's memory: owns snapshots, routines, configurations, runs and exports.

    Promises what `PostgresTier` promises: one operation is all or nothing; context writes are a
    compare-and-set (create) or "only if newer" (write-behind); a finished run is never finished again.
    """

    def _export_value(self, record: ExportRecord) -> Any:
        return self.codec.export_value(
            record.run_id, record.destination, record.scope, record.key, record.variable, record.sensitivity, record.value
        )

    def __init__(self, codec: Codec = DEFAULT_CODEC) -> None:
        self.codec = codec
        self._snapshots: dict[str, tuple[int, int, str]] = {}  # context id -> (epoch, version, JSON document)
        self._routines: dict[str, dict[int, str]] = {}
        self._configs: dict[tuple[str, str], tuple[int, str]] = {}
        self._runs: dict[str, RunRow] = {}
        self.blackboard: dict[tuple[str, str], dict[str, Any]] = {}
        self.exports: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._keys: set[str] = set()
        self._history: dict[str, tuple[int, str]] = {}  # entry id -> (its mark, the entry as JSON)
        self._marks = 0  # as a sequence hands them out
        self.writes = 0  # committed write operations, as `runctx` counts L3 writes
        self._lock = threading.RLock()
        self._init_waits()
        self._init_blobs()

    # ---- contexts ------------------------------------------------------------------------------

    def _encode(self, ctx: RunContext) -> str:
        _check_width(f"save context {ctx.context_id[:40]}", ctx.context_id, 300)
        return _jsonb_text(f"save context {ctx.context_id}", self.codec.to_document(ctx))

    def get_context(self, context_id: str) -> RunContext | None:
        with self._lock:
            stored = self._snapshots.get(context_id)
        return None if stored is None else self._context_of(stored)

    def _context_of(self, stored: tuple[int, int, str]) -> RunContext:
        epoch, version, document = stored
        ctx = self.codec.from_document(json.loads(document), key="L3 context")
        ctx.version, ctx.epoch = version, epoch
        return ctx

    def context_version(self, context_id: str) -> int | None:
        with self._lock:
            stored = self._snapshots.get(context_id)
        return None if stored is None else stored[1]

    def _create(self, ctx: RunContext) -> None:
        document = self._encode(ctx)
        if ctx.context_id in self._snapshots:
            raise VersionConflict("L3", f"context_snapshots/{ctx.context_id}", 0, self._snapshots[ctx.context_id][1])
        self._snapshots[ctx.context_id] = (ctx.epoch, ctx.version, document)
        self._insert_history([created_entry(ctx, codec=self.codec, now=time.time()).to_json()])

    def _write_if_newer(self, ctx: RunContext, document: str | None = None) -> bool:
        stored = self._snapshots.get(ctx.context_id)
        if stored is not None and (stored[0], stored[1]) >= (ctx.epoch, ctx.version):
            return False
        self._snapshots[ctx.context_id] = (ctx.epoch, ctx.version, document or self._encode(ctx))
        return True

    def create_context(self, ctx: RunContext) -> None:
        with self._lock:
            self._create(ctx)
            self.writes += 1

    def create_contexts(self, contexts: list[RunContext]) -> int:
        with self._lock:
            new = [ctx for ctx in contexts if ctx.context_id not in self._snapshots]
            for ctx in new:
                self._create(ctx)
            self.writes += 1
            return len(new)

    def write_context(self, ctx: RunContext) -> bool:
        with self._lock:
            written = self._write_if_newer(ctx)
            self.writes += 1
            return written

    def write_contexts(self, contexts: list[RunContext], history: Sequence[str] = ()) -> int:
        with self._lock:
            self.writes += 1
            written = sum(self._write_if_newer(ctx) for ctx in contexts)
            self._insert_history(history)
            return written

    # ---- history -------------------------------------------------------------------------------

    def _insert_history(self, raws: Sequence[str]) -> None:
        for entry in map(HistoryEntry.from_json, raws):
            if entry.id not in self._history:
                self._marks += 1
                self._history[entry.id] = (self._marks, entry.to_json())

    def add_history(self, entries: Sequence[HistoryEntry]) -> None:
        with self._lock:
            self._insert_history([entry.to_json() for entry in entries])
            self.writes += 1

    def run_history(self, run_id: str, *, after: int = 0, known: frozenset[str] = frozenset()) -> tuple[list[HistoryEntry], int]:
        with self._lock:
            rows = sorted((mark, entry_id, raw) for entry_id, (mark, raw) in self._history.items() if mark > after)
        mine = [(mark, entry_id, HistoryEntry.from_json(raw)) for mark, entry_id, raw in rows]
        mine = [(mark, entry_id, entry) for mark, entry_id, entry in mine if entry.run_id == run_id]
        return [entry for _, entry_id, entry in mine if entry_id not in known], max((m for m, _, _ in mine), default=after)

    def history_count(self, run_id: str) -> int:
        return len(self.run_history(run_id)[0])

    # ---- the run ledger ------------------------------------------------------------------------

    def create_run(self, run: RunRow, root: RunContext) -> None:
        operation = f"create run {run.run_id[:100]}"
        _check_width(operation, run.run_id, 100)
        _check_width(operation, run.routine_name, 200)
        meta = json.loads(_jsonb_text(operation, run.meta))
        with self._lock:
            if run.run_id in self._runs:
                raise RefusedByDatabase(operation, "23505", 'duplicate key value violates unique constraint "runs_pkey"')
            holder = self.run_by_key(run.idempotency_key) if run.idempotency_key is not None else None
            if holder is not None:
                raise RunExists(run.idempotency_key or "", holder.run_id, holder.request_digest)
            self._create(root)
            self._runs[run.run_id] = replace(run, meta=meta, created_at=_now(), updated_at=_now())
            self.writes += 1

    def run_by_key(self, key: str) -> RunRow | None:
        with self._lock:
            return next((run for run in self._runs.values() if run.idempotency_key == key), None)

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
        operation = f"finish run {run_id}"
        stored_meta = json.loads(_jsonb_text(operation, meta))
        if error is not None and "\x00" in error:
            raise RefusedByDatabase(operation, "22021", "invalid byte sequence for encoding \"UTF8\": 0x00")
        records = [(record, json.loads(_jsonb_text(operation, self._export_value(record)))) for record in exports]
        for record in exports:
            for text in (record.variable, record.key, record.scope):
                _check_width(operation, text, 200)
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.status in FINAL_STATUSES or (epoch is not None and run.epoch != epoch):
                return False
            documents = [(ctx, self._encode(ctx)) for ctx in contexts]  # encode all before changing anything
            self._runs[run_id] = replace(run, status=status, error=error, meta={**run.meta, **stored_meta}, finished_at=_now())
            for ctx, document in documents:
                self._write_if_newer(ctx, document)
            for record, value in records:
                if record.destination == "blackboard":
                    previous = self.blackboard.get((record.scope, record.key))
                    self.blackboard[(record.scope, record.key)] = {
                        "value": value, "sensitivity": record.sensitivity, "run_id": record.run_id,
                        "version": 1 if previous is None else previous["version"] + 1,
                    }
                else:
                    self.exports.setdefault(
                        (record.run_id, record.key, record.scope),
                        {"variable": record.variable, "value": value, "sensitivity": record.sensitivity},
                    )
            self._insert_history(history)
            self.writes += 1
            return True

    def list_runs(self, *, status: str | None = None, routine: str | None = None, limit: int = 50) -> list[RunRow]:
        with self._lock:
            found = [
                run for run in self._runs.values()
                if (status is None or run.status == status) and (routine is None or run.routine_name == routine)
            ]
        found.sort(key=lambda run: (run.created_at or _now(), run.run_id), reverse=True)
        return found[:limit]

    def running_runs(self, limit: int = 1000) -> list[RunRow]:
        with self._lock:
            running = [run for run in self._runs.values() if run.status not in FINAL_STATUSES]
        running.sort(key=lambda run: run.updated_at or run.created_at or _now())
        return [replace(run, meta=json.loads(json.dumps(run.meta))) for run in running[:limit]]

    def reopen_run(self, run_id: str) -> RunRow | None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.status not in ("failed", "cancelled"):
                return None
            self._runs[run_id] = replace(run, status="running", error=None, finished_at=None, updated_at=_now())
            self._reopen_waits(run_id)
            self.writes += 1
            return self._runs[run_id]

    def begin_rewind(self, run_id: str, from_epoch: int) -> int | None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.status in FINAL_STATUSES or run.epoch != from_epoch:
                return None
            self._runs[run_id] = replace(run, epoch=from_epoch + 1, updated_at=_now())
            self.writes += 1
            return from_epoch + 1

    def run_contexts(self, run_id: str) -> list[RunContext]:
        with self._lock:
            stored = list(self._snapshots.values())
        contexts = [self._context_of(entry) for entry in stored]
        return [ctx for ctx in contexts if ctx.run_id == run_id]

    def prune_runs(self, older_than_s: float, *, limit: int = 500) -> dict[str, list[str]]:
        cutoff = _now() - dt.timedelta(seconds=older_than_s)
        with self._lock:
            doomed = sorted(
                (run for run in self._runs.values()
                 if run.status in FINAL_STATUSES and run.finished_at is not None and run.finished_at < cutoff),
                key=lambda run: run.finished_at or cutoff,
            )[:limit]
            pruned: dict[str, list[str]] = {}
            for run in doomed:
                del self._runs[run.run_id]
                contexts = [cid for cid, entry in self._snapshots.items() if self._context_of(entry).run_id == run.run_id]
                for context_id in contexts:
                    del self._snapshots[context_id]
                pruned[run.run_id] = contexts
            gone = set(pruned)
            self._delete_waits(gone)
            self._release_blobs(gone)
            self._history = {i: kept for i, kept in self._history.items() if json.loads(kept[1])["run_id"] not in gone}
            return pruned

    def discard_context(self, context_id: str) -> None:
        with self._lock:
            self._snapshots.pop(context_id, None)
            self.writes += 1

    def get_run(self, run_id: str) -> RunRow | None:
        with self._lock:
            run = self._runs.get(run_id)
            return None if run is None else replace(run, meta=json.loads(json.dumps(run.meta)))

    # ---- routine definitions and configurations ----------------------------------------------------

    def get_config(self, kind: str, name: str) -> ConfigEntry | None:
        with self._lock:
            stored = self._configs.get((kind, name))
        if stored is None:
            return None
        return ConfigEntry(key=config_key(kind, name), version=stored[0], data=json.loads(stored[1]))

    def put_config(self, kind: str, name: str, data: Any, *, expected_version: int | None = None) -> int:
        document = json.dumps(data)
        with self._lock:
            current = self._configs.get((kind, name), (None, ""))[0]
            if expected_version is not None and (current or 0) != expected_version:
                raise VersionConflict("L3", f"configurations/{kind}/{name}", expected_version, current)
            version = (current or 0) + 1
            self._configs[(kind, name)] = (version, document)
            self.writes += 1
            return version

    def get_routine(self, name: str, version: int | None = None) -> ConfigEntry | None:
        with self._lock:
            versions = self._routines.get(name, {})
            chosen = version if version is not None else max(versions, default=None)
            document = versions.get(chosen) if chosen is not None else None
        if document is None or chosen is None:
            return None
        return ConfigEntry(key=routine_key(name, version), version=chosen, data=json.loads(document))

    def put_routine(self, name: str, definition: Any) -> int:
        document = json.dumps(definition)
        with self._lock:
            versions = self._routines.setdefault(name, {})
            same = [v for v, stored in versions.items() if json.loads(stored) == json.loads(document)]
            if same:  # a version is its content: the same definition is the same version
                return max(same)
            version = max(versions, default=0) + 1
            versions[version] = document
            self.writes += 1
            return version

    def reseal(self, old_key_ids: set[str], *, limit: int = 100) -> int:
        markers = [f"v1.{key_id}." for key_id in old_key_ids]
        done = 0
        with self._lock:
            for context_id, (epoch, version, document) in list(self._snapshots.items()):
                if done >= limit:
                    break
                if any(marker in document for marker in markers):
                    ctx = self.codec.from_document(json.loads(document), key="L3 context")
                    ctx.version, ctx.epoch = version, epoch
                    self._snapshots[context_id] = (epoch, version, self._encode(ctx))
                    done += 1
            for entry_id, (mark, raw) in list(self._history.items()):
                if done < limit and any(marker in raw for marker in markers):
                    self._history[entry_id] = (mark, resealed(HistoryEntry.from_json(raw), self.codec).to_json())
                    done += 1
            for blob_id, data in list(self._blobs.items()):
                if done < limit and any(marker.encode() in data for marker in markers):
                    value = self.codec.open_blob(blob_id, data)
                    self._blobs[blob_id] = self.codec.blob_data(blob_id, "secret", value, b"")
                    done += 1
            for (run_id, event), signal in self._signals.items():
                if done < limit and any(marker in signal["payload"] for marker in markers):
                    value = self.codec.open_signal(run_id, event, signal["sensitivity"], json.loads(signal["payload"]))
                    signal["payload"] = json.dumps(self.codec.signal_value(run_id, event, signal["sensitivity"], value))
                    done += 1
        return done

    def forget_keys(self, key_ids: set[str]) -> None:
        with self._lock:
            self._keys -= key_ids

    def record_key(self, key_id: str) -> None:
        with self._lock:
            self._keys.add(key_id)

    def key_ids(self) -> set[str]:
        with self._lock:
            return set(self._keys)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass
