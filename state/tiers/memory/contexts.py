"""The in-memory twin's contexts and write-behind schedule (`L2Contexts`), as the Lua scripts keep them."""

from __future__ import annotations

import json

from state.errors import ContextCorruption, LineageLost
from state.models import LAST_STEPS_KEPT, RunContext
from state.tiers.data import CommitReply, CommitRequest, CommitStatus, CommittedState, StoredContext
from state.tiers.memory.base import Entry, MemoryState


class MemoryContexts(MemoryState):
    """Contexts in memory: promises what `RedisContexts` promises, atomically under one lock."""

    def raw_context(self, context_id: str) -> Entry | None:
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
        ctx = self.codec.load_state(entry.payload, list(entry.applied), key=key, fields=dict(entry.fields))
        if ctx.version != entry.version:
            raise ContextCorruption(key, f"payload holds version {ctx.version}, entry says {entry.version}")
        ctx.take_last_steps(entry.scored)
        return StoredContext(context=ctx, version=ctx.version, dirty=dirty, live=entry.live)

    def commit(self, request: CommitRequest, *, now: float) -> CommitReply:
        ctx, report = request.context, request.report
        step_id = request.step_id
        payload, payload_checksum = request.encoded or self.encode_state(ctx)
        with self._lock:
            current = self._live(self._contexts, ctx.context_id)
            if current is None and request.expected_version != 0:
                return CommitReply(CommitStatus.NO_ENTRY, 0)
            if current is not None and current.applied_count != len(current.applied):  # damaged: as Lua's -3
                del self._contexts[ctx.context_id]
                raise LineageLost(ctx.context_id, "the L2 entry was damaged")
            if current is not None and (
                (request.expected_epoch is not None and current.epoch != request.expected_epoch)
                or (request.require_live and not current.live)
            ):
                return CommitReply(CommitStatus.OTHER_LINEAGE, current.version)
            applied = [] if current is None else current.applied
            version = 0 if current is None else current.version
            if step_id and step_id in applied:
                return CommitReply(CommitStatus.ALREADY_APPLIED, version)
            if report is not None and self._run(report.run_id).failed is not None:
                return CommitReply(CommitStatus.RUN_FAILED, version)
            if current is not None and current.version != request.expected_version:
                newer = self._newer(ctx, current, request.expected_version) if request.expected_epoch is not None else None
                return CommitReply(CommitStatus.STALE, current.version, newer)
            live = True if current is None else current.live
            applied = applied + [step_id] if step_id else list(applied)
            scored = () if current is None else current.scored
            if step_id:
                scored = (*scored[1 - LAST_STEPS_KEPT :], (ctx.version, step_id))
            detached = self.codec.pending_fields(ctx)
            fields = {} if current is None else {f: d for f, d in current.fields.items() if f not in detached.drop}
            self._contexts[ctx.context_id] = Entry(
                ctx.version, payload_checksum, payload, None, ctx.epoch, live, applied, scored=scored,
                fields={**fields, **detached.write},
            )
            self.codec.stored(ctx)
            if report is not None:
                run = self._run(report.run_id)
                run.steps[report.step_id] = json.dumps(report.record(now))
                run.progress = now
            first = self._first.setdefault(ctx.context_id, now)
            self._due[ctx.context_id] = min(now + self.config.write_behind_debounce_s, first + self.config.write_behind_max_delay_s)
            if request.outbox is not None:
                self._queues.setdefault(request.outbox.queue, []).insert(0, request.outbox.message)
            if request.history:
                self._history.setdefault(ctx.context_id, []).append(request.history)
            return CommitReply(CommitStatus.COMMITTED, ctx.version)

    @staticmethod
    def _newer(ctx: RunContext, current: Entry, expected_version: int) -> CommittedState | None:
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

    def decode_state(
        self, payload: bytes, payload_checksum: str, applied: list[str], *, key: str, known: RunContext | None = None
    ) -> RunContext:
        if not self.codec.verify(payload, payload_checksum, where=key):
            raise ContextCorruption(key, "checksum does not match payload")
        return self.codec.load_state(payload, applied, key=key, known=known)

    def fill_contexts(self, contexts: list[RunContext], *, live: bool = False) -> int:
        return sum(self.fill_context(ctx, live=live) for ctx in contexts)

    def fill_context(self, ctx: RunContext, *, live: bool = False) -> bool:
        payload = self.codec.dump_state(ctx, whole=True)
        fields = self.codec.pending_fields(ctx).write
        self.codec.stored(ctx)
        with self._lock:
            current = self._live(self._contexts, ctx.context_id)
            if current is not None and (current.epoch, current.version) >= (ctx.epoch, ctx.version):
                return False
            expires_at = None if live else self.clock() + self.config.l2_context_ttl_s
            self._contexts[ctx.context_id] = Entry(
                ctx.version, self.codec.checksum(payload), payload, expires_at, ctx.epoch, live, list(ctx.applied_steps),
                fields=fields,
            )
            return True

    def mark_flushed(
        self, context_id: str, version: int, *, now: float, epoch: int = 1, expire: bool = True, history_taken: str = ""
    ) -> bool:
        debounce_s = self.config.write_behind_debounce_s
        with self._lock:
            waiting = self._history.get(context_id, [])
            if history_taken and history_taken in waiting:
                del waiting[: waiting.index(history_taken) + 1]
            current = self._live(self._contexts, context_id)
            if current is not None and (current.epoch, current.version) > (epoch, version):
                self._first[context_id] = now
                self._due[context_id] = now + debounce_s
                return False
            self._due.pop(context_id, None)
            self._first.pop(context_id, None)
            if current is not None and expire:
                current.expires_at = self.clock() + self.config.l2_context_ttl_s
            return True

    def history_lists(self, context_ids: list[str]) -> dict[str, list[str]]:
        with self._lock:
            return {context_id: list(self._history.get(context_id, ())) for context_id in context_ids}

    def push_history(self, context_id: str, entry: str, watch: str) -> None:
        with self._lock:
            self._history.setdefault(context_id, []).append(entry)

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
