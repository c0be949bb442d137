"""The in-memory twin of the Redis tier: the same contract in one process, for fast engine tests.

It keeps entries as encoded payloads with their checksums, as Redis does, so a reader gets its own
copy and a damaged payload is detected the same way. `tests/test_tier_contracts.py` holds it to
the behaviour of the Lua scripts.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from state.codec import DEFAULT_CODEC, Codec
from state.errors import ContextCorruption, LineageLost, VersionConflict
from state.keys import RedisKeys
from state.models import LAST_STEPS_KEPT, RunContext, StateCacheConfig
from state.tiers.contracts import (
    CommitResult,
    CommittedState,
    ConfigEntry,
    Outbox,
    StepReport,
    StepStart,
    StoredContext,
)


@dataclass
class _Entry:
    version: int
    checksum: str
    payload: bytes
    expires_at: float | None = None  # None: no TTL
    epoch: int = 1
    live: bool = True  # a live lineage, or a reader's copy filled from L3
    applied: list[str] = field(default_factory=list)  # beside the payload, as Redis keeps them
    applied_count: int = -1  # how many there are (-1: as many as the list holds), as the entry's n field
    # The newest applied steps with the version each one's commit made (as Redis scores them).
    scored: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        if self.applied_count < 0:
            self.applied_count = len(self.applied)


@dataclass
class _Run:
    attempts: dict[str, int] = field(default_factory=dict)
    step_attempts: dict[str, int] = field(default_factory=dict)
    steps: dict[str, str] = field(default_factory=dict)
    failed: str | None = None
    hidden_error: dict | None = None
    l3_writes: int = 0
    done: bool = False
    progress: float | None = None


class MemoryL2:
    """L2 in one process's memory: owns its entries, write-behind schedule and run records.

    Promises what `RedisTier` promises (compare-and-set commits, checksummed entries, dirty entries
    that never expire), atomically under one lock, with TTLs measured by ``clock``.
    """

    def __init__(self, *, prefix: str, config: StateCacheConfig, codec: Codec = DEFAULT_CODEC, clock=time.time) -> None:
        self.keys = RedisKeys(prefix)
        self.prefix = prefix
        self.context_ttl_s = config.l2_context_ttl_s
        self.config_ttl_s = config.l2_config_ttl_s
        self.codec = codec
        self.clock = clock
        self._contexts: dict[str, _Entry] = {}
        self._configs: dict[str, _Entry] = {}
        self._due: dict[str, float] = {}
        self._first: dict[str, float] = {}
        self._runs: dict[str, _Run] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._queues: dict[str, list[bytes]] = {}  # outbox messages pushed by commits, newest first (as LPUSH)
        self._lock = threading.RLock()
        self._done = threading.Condition(self._lock)

    # ---- storage helpers -----------------------------------------------------------------------

    def _live(self, table: dict[str, _Entry], key: str) -> _Entry | None:
        entry = table.get(key)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= self.clock():
            del table[key]
            return None
        return entry

    def raw_context(self, context_id: str) -> _Entry | None:
        """The stored entry itself (tests damage it to see corruption handled)."""
        with self._lock:
            return self._live(self._contexts, context_id)

    def expires_in(self, context_id: str) -> float | None:
        """Seconds until the entry expires; None if it has no TTL or does not exist."""
        with self._lock:
            entry = self._live(self._contexts, context_id)
            return None if entry is None or entry.expires_at is None else entry.expires_at - self.clock()

    # ---- contexts ------------------------------------------------------------------------------

    def get_context(self, context_id: str) -> StoredContext | None:
        key = self.keys.context(context_id)
        with self._lock:
            entry = self._live(self._contexts, context_id)
            dirty = context_id in self._due
        if entry is None:
            return None
        if not self.codec.verify(entry.payload, entry.checksum, where=key):
            raise ContextCorruption(key, "checksum does not match payload")
        if entry.applied_count != len(entry.applied):
            raise ContextCorruption(key, f"holds {entry.applied_count} applied steps, its set {len(entry.applied)}")
        ctx = self.codec.load_state(entry.payload, list(entry.applied), key=key)
        if ctx.version != entry.version:
            raise ContextCorruption(key, f"payload holds version {ctx.version}, entry says {entry.version}")
        ctx.take_last_steps(entry.scored)
        return StoredContext(context=ctx, version=ctx.version, dirty=dirty, live=entry.live)

    def commit_context(
        self,
        ctx: RunContext,
        *,
        expected_version: int,
        now: float,
        debounce_s: float,
        max_delay_s: float,
        expected_epoch: int | None = None,
        require_live: bool = False,
        step_id: str | None = None,
        report: StepReport | None = None,
        outbox: Outbox | None = None,
        encoded: tuple[bytes, str] | None = None,
    ) -> CommitResult:
        if report is not None and step_id is None:  # a step's record is a step's commit
            step_id = report.step_id
        if outbox is not None and report is None:
            raise ValueError("an outbox message rides only in a step's commit")
        payload, payload_checksum = encoded or self.encode_state(ctx)
        with self._lock:
            current = self._live(self._contexts, ctx.context_id)
            if current is None and expected_version != 0:
                return CommitResult.NO_ENTRY
            if current is not None:
                if (expected_epoch is not None and current.epoch != expected_epoch) or (require_live and not current.live):
                    raise LineageLost(ctx.context_id, "the L2 entry is of another epoch, or not a live lineage")
            if current is not None and current.applied_count != len(current.applied):  # damaged: as Lua's -3
                del self._contexts[ctx.context_id]
                raise LineageLost(ctx.context_id, "the L2 entry was damaged")
            applied = [] if current is None else current.applied
            if step_id and step_id in applied:
                return CommitResult.ALREADY_APPLIED
            if report is not None and self._run(report.run_id).failed is not None:
                return CommitResult.RUN_FAILED
            if current is not None and current.version != expected_version:
                newer = self._newer(ctx, current, expected_version) if expected_epoch is not None else None
                raise VersionConflict("L2", self.keys.context(ctx.context_id), expected_version, current.version, newer)
            live = True if current is None else current.live
            applied = applied + [step_id] if step_id else list(applied)
            scored = () if current is None else current.scored
            if step_id:
                scored = (*scored[1 - LAST_STEPS_KEPT :], (ctx.version, step_id))
            self._contexts[ctx.context_id] = _Entry(
                ctx.version, payload_checksum, payload, None, ctx.epoch, live, applied, scored=scored
            )
            if report is not None:
                run = self._run(report.run_id)
                run.steps[report.step_id] = json.dumps(report.record(now))
                run.progress = now
            first = self._first.setdefault(ctx.context_id, now)
            self._due[ctx.context_id] = min(now + debounce_s, first + max_delay_s)
            if outbox is not None:
                self._queues.setdefault(outbox.queue, []).insert(0, outbox.message)
            return CommitResult.COMMITTED

    @staticmethod
    def _newer(ctx: RunContext, current: _Entry, expected_version: int) -> CommittedState | None:
        """As Redis tells a stale writer: the current state, and the steps since its version (known
        here for the last LAST_STEPS_KEPT commits)."""
        behind = current.version - expected_version
        since = [pair for pair in current.scored if pair[0] > expected_version]
        if behind <= 0 or [version for version, _ in since] != list(range(expected_version + 1, current.version + 1)):
            return None
        steps = tuple(step_id for _, step_id in since)
        return CommittedState(ctx.context_id, current.version, current.epoch, steps, current.payload, current.checksum)

    @property
    def carries_outbox(self) -> bool:
        return True

    def take_pushed(self, queue: str) -> list[bytes]:
        """The messages commits pushed onto ``queue``, oldest first; the queue is left empty."""
        with self._lock:
            return list(reversed(self._queues.pop(queue, [])))

    def encode_state(self, ctx: RunContext) -> tuple[bytes, str]:
        payload = self.codec.dump_state(ctx)
        return payload, self.codec.checksum(payload)

    def decode_state(self, payload: bytes, payload_checksum: str, applied: list[str], *, key: str) -> RunContext:
        if not self.codec.verify(payload, payload_checksum, where=key):
            raise ContextCorruption(key, "checksum does not match payload")
        return self.codec.load_state(payload, applied, key=key)

    def fill_context(self, ctx: RunContext, *, live: bool = False) -> bool:
        payload = self.codec.dump_state(ctx)
        with self._lock:
            current = self._live(self._contexts, ctx.context_id)
            if current is not None and (current.epoch, current.version) >= (ctx.epoch, ctx.version):
                return False
            expires_at = None if live else self.clock() + self.context_ttl_s
            self._contexts[ctx.context_id] = _Entry(
                ctx.version, self.codec.checksum(payload), payload, expires_at, ctx.epoch, live, list(ctx.applied_steps)
            )
            return True

    def mark_flushed(
        self, context_id: str, version: int, *, now: float, debounce_s: float, epoch: int = 1, expire: bool = True
    ) -> bool:
        with self._lock:
            current = self._live(self._contexts, context_id)
            if current is not None and (current.epoch, current.version) > (epoch, version):
                self._first[context_id] = now
                self._due[context_id] = now + debounce_s
                return False
            self._due.pop(context_id, None)
            self._first.pop(context_id, None)
            if current is not None and expire:
                current.expires_at = self.clock() + self.context_ttl_s
            return True

    def evict_context(self, context_id: str, up_to_version: int | None = None) -> bool:
        with self._lock:
            current = self._live(self._contexts, context_id)
            if current is None or (up_to_version is not None and current.version > up_to_version):
                return False
            del self._contexts[context_id]
            self._due.pop(context_id, None)
            self._first.pop(context_id, None)
            return True

    def context_ids(self) -> list[str]:
        with self._lock:
            return [context_id for context_id in list(self._contexts) if self._live(self._contexts, context_id)]

    def config_keys(self) -> list[str]:
        with self._lock:
            return [key for key in list(self._configs) if self._live(self._configs, key)]

    def due_time(self, context_id: str) -> float | None:
        with self._lock:
            return self._due.get(context_id)

    def claim_due(self, now: float, *, lease_s: float, limit: int = 100) -> list[str]:
        with self._lock:
            due = sorted((at, cid) for cid, at in self._due.items() if at <= now)[:limit]
            for _, cid in due:
                self._due[cid] = now + lease_s
            return [cid for _, cid in due]

    def pending_flushes(self) -> int:
        with self._lock:
            return len(self._due)

    def next_due(self) -> float | None:
        with self._lock:
            return min(self._due.values(), default=None)

    def oldest_unwritten(self) -> float | None:
        with self._lock:
            return min(self._first.values(), default=None)

    # ---- routine definitions and configurations ------------------------------------------------

    def get_config(self, key: str) -> ConfigEntry | None:
        with self._lock:
            entry = self._live(self._configs, key)
            if entry is None:
                return None
            if not self.codec.verify(entry.payload, entry.checksum, where=self.keys.config(key)):
                del self._configs[key]
                raise ContextCorruption(self.keys.config(key), "checksum does not match payload")
        return ConfigEntry(key=key, version=entry.version, data=self.codec.load_document(entry.payload, key=key))

    def put_config(self, entry: ConfigEntry) -> None:
        payload = self.codec.dump_document(entry.data)
        with self._lock:
            self._configs[entry.key] = _Entry(entry.version, self.codec.checksum(payload), payload, self.clock() + self.config_ttl_s)

    def evict_config(self, key: str) -> bool:
        with self._lock:
            return self._configs.pop(key, None) is not None

    # ---- run records ------------------------------------------------------------------------------

    def _run(self, run_id: str) -> _Run:
        return self._runs.setdefault(run_id, _Run())

    def start_step(self, run_id: str, task_id: str, step_id: str) -> StepStart:
        with self._lock:
            run = self._run(run_id)
            run.attempts[task_id] = run.attempts.get(task_id, 0) + 1
            run.step_attempts[step_id] = run.step_attempts.get(step_id, 0) + 1
            return StepStart(attempt=run.attempts[task_id] + 1, run_failed=run.failed is not None)

    def run_failed(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._runs and self._runs[run_id].failed is not None

    def finish_step(
        self, run_id: str, step_id: str, *, status: str = "failed", worker: str = "?", duration_s: float = 0.0,
        traceback: str | None = None, record: dict[str, Any] | None = None,
    ) -> None:
        if record is None:
            record = {"status": status, "worker": worker, "duration_s": round(duration_s, 6), "finished_at": self.clock()}
            if traceback:
                record["traceback"] = traceback
        now = record["finished_at"]
        with self._lock:
            self._run(run_id).steps[step_id] = json.dumps(record)
            self._run(run_id).progress = now

    def keep_hidden_error(self, run_id: str, sealed: dict[str, str]) -> None:
        with self._lock:
            run = self._run(run_id)
            if run.hidden_error is None:
                run.hidden_error = dict(sealed)

    def announce_routine(self, routine: str, version: int) -> None:
        pass  # one process: nobody else to prepare

    def mark_failed(self, run_id: str, error: str) -> bool:
        with self._lock:
            run = self._run(run_id)
            if run.failed is not None:
                return False
            run.failed = error
            return True

    def failure_of(self, run_id: str) -> str | None:
        with self._lock:
            return self._runs[run_id].failed if run_id in self._runs else None

    def forget_run(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def count_l3_write(self, run_id: str, count: int = 1) -> None:
        with self._lock:
            self._run(run_id).l3_writes += count

    def run_summary(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            run = self._run(run_id)
            steps = []
            for step_id, raw in run.steps.items():
                record = json.loads(raw)
                counted = run.step_attempts.get(step_id)  # starts after the first, if any were counted
                record["attempts"] = max(record.get("attempts", 1), 1 if counted is None else counted + 1)
                steps.append({"id": step_id, **record})
            l3_writes = run.l3_writes
            hidden_error = run.hidden_error
        steps.sort(key=lambda step: step["finished_at"])
        summary: dict[str, Any] = {"steps": steps, "l3_writes": l3_writes}
        if hidden_error is not None:
            summary["hidden_error"] = dict(hidden_error)
        return summary

    def announce_done(self, run_id: str) -> None:
        with self._done:
            self._run(run_id).done = True
            self._done.notify_all()

    def wait_done(self, run_id: str, timeout_s: float) -> bool:
        with self._done:
            return self._done.wait_for(lambda: self._run(run_id).done, timeout=max(timeout_s, 0.01))

    def touch_progress(self, run_ids: list[str], now: float) -> None:
        with self._lock:
            for run_id in run_ids:
                self._run(run_id).progress = now

    def progress_of(self, run_ids: list[str]) -> dict[str, float | None]:
        with self._lock:
            return {run_id: self._runs[run_id].progress if run_id in self._runs else None for run_id in run_ids}

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        with self._lock:
            current = self._leases.get(name)
            if current is None or current[0] == holder or current[1] <= self.clock():
                self._leases[name] = (holder, self.clock() + ttl_s)
                return True
            return False

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass
