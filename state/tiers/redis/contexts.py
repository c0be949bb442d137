"""L2's contexts on Redis, with their write-behind schedule.

A context entry is a hash {v: version, e: epoch, c: checksum, d: payload, o: origin, n: applied
count}; the steps it holds are a sorted set beside it, so a step's commit adds one id instead of
rewriting the run's history (a commit costs the same at the 10,000th step as at the 10th), and n
lets a lost set be seen instead of trusted. Origin 'l' marks a live lineage (created, committed to,
or rebuilt by a rewind), 'f' a reader's copy filled from L3; steps only read and commit live
entries. A live entry has no TTL while its run goes on (losing it would cost a rewind); a reader's
copy, and a finished run's contexts, get the context TTL. The write-behind schedule (per shard, a
sorted set of due times and a hash of first-change times) lives beside the contexts, so any worker
can finish a flush that another one scheduled.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from state import bus
from state.errors import ContextCorruption, LineageLost
from state.models import LAST_STEPS_KEPT, RunContext
from state.tiers.data import CommitReply, CommitRequest, CommitStatus, CommittedState, StoredContext, watch_message
from state.tiers.redis.connection import RedisConnection, as_count

RECORD_TTL_S = 7 * 24 * 3600  # run records live this long after their run finished
STALE_STEPS_TOLD = 64  # a commit up to this many versions behind is told the steps it missed

# The commit script's ARGV, by name, in its order (`lua/commit.lua` says what each one is).
COMMIT_ARGV = (
    "expected_version", "version", "payload", "checksum", "now", "debounce_s", "max_delay_s", "context_id",
    "channel", "expected_epoch", "epoch", "require_live", "step_id", "step_record", "records_ttl_s", "broadcast",
    "message", "stale_steps_told", "history", "watch_channel", "watch", "outbox_database", "home_database",
)
_STATUSES = {
    1: CommitStatus.COMMITTED, 0: CommitStatus.STALE, -1: CommitStatus.NO_ENTRY, -2: CommitStatus.OTHER_LINEAGE,
    2: CommitStatus.ALREADY_APPLIED, 3: CommitStatus.RUN_FAILED,
}


FILL_BATCH = 500  # fills sent in one pipeline (a fan-out creates its items' contexts at once)


class RedisContexts(RedisConnection):
    """L2's contexts and write-behind schedule (`L2Contexts`). Promises: a commit is a
    compare-and-set (a stale writer is told so, never a lost update); an entry that fails its
    checksum raises ContextCorruption instead of being served."""

    def _context_keys(self, context_id: str) -> list[str]:
        """The keys of one context, all in its shard: entry, applied steps, due set, first-change hash,
        history list."""
        k = self.keys
        return [
            k.context(context_id), k.applied(context_id), k.write_behind_due(context_id), k.write_behind_first(context_id),
            k.history(context_id),
        ]

    def get_context(self, context_id: str) -> StoredContext | None:
        key, applied_key, due_key, *_ = self._context_keys(context_id)
        try:
            entry, applied, due, newest, detached = self._call(
                lambda: self._scripts["read"](keys=[key, applied_key, due_key], args=[context_id, LAST_STEPS_KEPT])
            )
        except ResponseError as exc:
            raise ContextCorruption(key, f"not a context entry ({exc})") from None
        version, stored_sum, payload, origin, applied_count = entry
        if version is None and payload is None:
            return None
        if version is None or stored_sum is None or payload is None:
            raise ContextCorruption(key, "entry is missing its version, checksum or payload")
        if not self.codec.verify(payload, stored_sum.decode(), where=key):
            raise ContextCorruption(key, "checksum does not match payload")
        if as_count(applied_count, 0) != len(applied):
            raise ContextCorruption(key, f"holds {as_count(applied_count, 0)} applied steps, its set {len(applied)}")
        fields = {field.decode(): data for field, data in zip(detached[::2], detached[1::2])}
        ctx = self.codec.load_state(payload, [step.decode() for step in applied], key=key, fields=fields)
        if ctx.version != int(version):
            raise ContextCorruption(key, f"payload holds version {ctx.version}, entry says {int(version)}")
        ctx.take_last_steps([(int(float(score)), step.decode()) for step, score in zip(newest[::2], newest[1::2])])
        return StoredContext(context=ctx, version=ctx.version, dirty=due is not None, live=origin == b"l")

    def commit(self, request: CommitRequest, *, now: float) -> CommitReply:
        if request.outbox is not None and self.cluster:
            raise ValueError("an outbox message rides only in a step's commit on one Redis (see carries_outbox)")
        keys, args = self._commit_arguments(request, now)
        status, actual, *stale = self._commit_script(keys, args)
        result = _STATUSES.get(int(status))
        if result is CommitStatus.COMMITTED:
            self.codec.stored(request.context)
        if result is None:  # -3: damaged
            self.evict_context(request.context.context_id)
            raise LineageLost(request.context.context_id, "the L2 entry was damaged")
        newer = None
        if result is CommitStatus.STALE and stale and request.expected_epoch is not None:
            # The script checked the entry's epoch first: a stale step commit was of the entry's epoch.
            newer = _newer(request, request.expected_epoch, int(actual), *stale)
        return CommitReply(result, int(actual), newer)

    def _commit_arguments(self, request: CommitRequest, now: float) -> tuple[list[str], list[Any]]:
        """The commit script's keys and arguments for ``request``: built here, from named fields."""
        ctx, report = request.context, request.report
        step_id = request.step_id or ""
        payload, checksum = request.encoded or self.encode_state(ctx)
        keys = self._context_keys(ctx.context_id)
        # A commit that pushes what follows it is not broadcast: that message carries the state to the
        # one process that needs it (or that process reads it), instead of waking every process.
        channel = "" if request.outbox is not None else self.bus_channel
        fields: dict[str, Any] = {
            "expected_version": request.expected_version, "version": ctx.version, "payload": payload,
            "checksum": checksum, "now": now, "debounce_s": self.config.write_behind_debounce_s,
            "max_delay_s": self.config.write_behind_max_delay_s, "context_id": ctx.context_id, "channel": channel,
            "expected_epoch": -1 if request.expected_epoch is None else request.expected_epoch, "epoch": ctx.epoch,
            "require_live": "1" if request.require_live else "0", "step_id": step_id, "step_record": "",
            "records_ttl_s": RECORD_TTL_S, "broadcast": "", "message": "", "stale_steps_told": STALE_STEPS_TOLD,
            "history": request.history or "", "watch_channel": self.keys.watch_channel if request.history else "",
            "watch": watch_message(ctx.run_id, ctx.context_id, ctx.version, step_id) if request.history else "",
            "outbox_database": "", "home_database": "",
        }
        if channel:
            fields["broadcast"] = bus.encode(self._commit_event(ctx, step_id, payload, checksum, now))
        if report is not None and not self.cluster:  # the step's record rides in the same script
            run_id = report.run_id
            keys += [
                self.keys.run_record(run_id, "steps", report.step_id), self.keys.run_record(run_id, "progress"),
                self.keys.run_record(run_id, "failed"),
            ]
            fields["step_record"] = json.dumps(report.record(now))
            if request.outbox is not None:
                keys.append(request.outbox.queue)
                fields["message"] = request.outbox.message
                if request.outbox.database is not None:
                    fields["outbox_database"], fields["home_database"] = request.outbox.database, self.database
        detached = self.codec.pending_fields(ctx)
        return keys, [fields[name] for name in COMMIT_ARGV] + _field_arguments(detached.write) + list(detached.drop)

    def _commit_event(self, ctx: RunContext, step_id: str, payload: bytes, checksum: str, now: float) -> bus.ContextCommitted:
        """The broadcast of a commit: a step's commit of a small context carries its state (a broadcast
        is pub/sub, in clear: a context with sensitive values never rides in it)."""
        carries = bool(step_id) and not ctx.holds_sensitive and len(payload) <= self.config.l1_update_max_bytes
        return bus.ContextCommitted(
            ctx.context_id, ctx.version, ctx.epoch, now,
            step=step_id if carries else None, payload=payload if carries else None, checksum=checksum if carries else None,
        )

    @property
    def carries_outbox(self) -> bool:
        return not self.cluster  # on a cluster the broker's queue is on no context's shard

    def encode_state(self, ctx: RunContext) -> tuple[bytes, str]:
        payload = self.codec.dump_state(ctx)
        return payload, self.codec.checksum(payload)

    def decode_state(
        self, payload: bytes, payload_checksum: str, applied: list[str], *, key: str, known: RunContext | None = None
    ) -> RunContext:
        if not self.codec.verify(payload, payload_checksum, where=key):
            raise ContextCorruption(key, "checksum does not match payload")
        return self.codec.load_state(payload, applied, key=key, known=known)

    def fill_context(self, ctx: RunContext, *, live: bool = False) -> bool:
        return bool(self._script("fill", *self._fill_arguments(ctx, live)))

    def fill_contexts(self, contexts: list[RunContext], *, live: bool = False) -> int:
        if self.cluster:  # a script's keys are in one slot: one by one
            return sum(self.fill_context(ctx, live=live) for ctx in contexts)
        script = self._scripts["fill"]
        filled = 0
        for start in range(0, len(contexts), FILL_BATCH):
            with self.client.pipeline(transaction=False) as pipe:
                for ctx in contexts[start : start + FILL_BATCH]:
                    keys, args = self._fill_arguments(ctx, live)
                    script(keys=keys, args=args, client=pipe)
                filled += sum(bool(reply) for reply in self._call(pipe.execute))
        return filled

    def _fill_arguments(self, ctx: RunContext, live: bool) -> tuple[list[str], list[Any]]:
        payload = self.codec.dump_state(ctx, whole=True)
        fields = self.codec.pending_fields(ctx).write
        self.codec.stored(ctx)
        ttl = 0 if live else self.config.l2_context_ttl_s
        key, applied_key = self._context_keys(ctx.context_id)[:2]
        head = [ctx.version, payload, self.codec.checksum(payload), ttl, ctx.epoch, "l" if live else "f"]
        return [key, applied_key], [*head, *_field_arguments(fields), *ctx.applied_steps]

    def mark_flushed(
        self, context_id: str, version: int, *, now: float, epoch: int = 1, expire: bool = True, history_taken: str = ""
    ) -> bool:
        ttl = self.config.l2_context_ttl_s if expire else 0
        debounce_s = self.config.write_behind_debounce_s
        args = [version, ttl, context_id, now, debounce_s, epoch, history_taken]
        return bool(self._script("mark_flushed", self._context_keys(context_id), args))

    # ---- history lists -----------------------------------------------------------------------------

    def history_lists(self, context_ids: list[str]) -> dict[str, list[str]]:
        """Each context's history entries waiting for L3, oldest first, in one round trip (a list
        holding another type is damage: it shows as empty, and the next push replaces it)."""
        if not context_ids:
            return {}
        with self.client.pipeline(transaction=False) as pipe:
            for context_id in context_ids:
                pipe.lrange(self.keys.history(context_id), 0, -1)
            replies = self._call(lambda: pipe.execute(raise_on_error=False))
        return {
            context_id: [raw.decode() for raw in reply] if isinstance(reply, list) else []
            for context_id, reply in zip(context_ids, replies)
        }

    def push_history(self, context_id: str, entry: str, watch: str) -> None:
        """Add an event to a context's history list (it goes to L3 with the context's next write)
        and say so on the watch channel."""
        key = self.keys.history(context_id)

        def push() -> None:
            try:
                self.client.rpush(key, entry)
            except ResponseError:  # damage: another type where the list belongs
                self.client.delete(key)
                self.client.rpush(key, entry)
            # A run's next commit makes its list last again; an event after its end goes with the records.
            self.client.expire(key, RECORD_TTL_S)
            self.client.publish(self.keys.watch_channel, watch)

        self._call(push)

    def evict_context(self, context_id: str, up_to_version: int | None = None) -> bool:
        return bool(
            self._script("evict", self._context_keys(context_id), [-1 if up_to_version is None else up_to_version, context_id])
        )

    def context_ids(self) -> list[str]:
        marker = ":ctx:"
        return [
            key.decode().split(marker, 1)[1]
            for key in self._call(lambda: list(self.client.scan_iter(match=f"{self.prefix}:{{c*}}{marker}*", count=1000)))
        ]

    # ---- the write-behind schedule ---------------------------------------------------------------

    def due_time(self, context_id: str) -> float | None:
        return self._call(lambda: self.client.zscore(self.keys.write_behind_due(context_id), context_id))

    def claim_due(self, now: float, *, lease_s: float, limit: int = 100) -> list[str]:
        # Every worker process asks this ten times a second. On one server, one script looks at
        # every shard's due set, from a random one on so that no shard waits behind a busy one.
        if not self.cluster:
            due_sets = self.keys.due_sets()
            ids = self._script("claim_due", due_sets, [now, lease_s, limit, random.randrange(len(due_sets)) + 1])
            return [raw.decode() for raw in ids]
        # On a cluster, one round trip finds the shards with something due (usually none); only those
        # are claimed, one script per shard (each touches one slot).
        counts = self._each_due_set(lambda pipe, key: pipe.zcount(key, "-inf", now))
        due_sets = [key for key, due in zip(self.keys.due_sets(), counts) if due]
        random.shuffle(due_sets)
        claimed: list[str] = []
        for due_set in due_sets:
            if len(claimed) >= limit:
                break
            ids = self._script("claim_due", [due_set], [now, lease_s, limit - len(claimed)])
            claimed += [raw.decode() for raw in ids]
        return claimed

    def _each_due_set(self, command: Callable[[Any, str], Any]) -> list[Any]:
        """One command per shard's due set, in one round trip; a damaged set answers its error
        (a claim then runs that shard's script, which rebuilds it)."""
        with self.client.pipeline(transaction=False) as pipe:
            for due_set in self.keys.due_sets():
                command(pipe, due_set)
            return self._call(lambda: pipe.execute(raise_on_error=False))

    def pending_flushes(self) -> int:
        return sum(n for n in self._each_due_set(lambda pipe, key: pipe.zcard(key)) if isinstance(n, int))

    def oldest_unwritten(self) -> float | None:
        with self.client.pipeline(transaction=False) as pipe:
            for first in self.keys.first_change_sets():
                pipe.hvals(first)
            shards = self._call(lambda: pipe.execute(raise_on_error=False))
        times = [float(t) for values in shards if isinstance(values, list) for t in values]
        return min(times, default=None)

    def next_due(self) -> float | None:
        firsts = self._each_due_set(lambda pipe, key: pipe.zrange(key, 0, 0, withscores=True))
        return min((first[0][1] for first in firsts if isinstance(first, list) and first), default=None)


def _field_arguments(fields: dict[str, bytes]) -> list[Any]:
    """Detached values as a script takes them: their count, then field and data, field and data..."""
    return [len(fields), *(part for pair in fields.items() for part in pair)]


def _newer(
    request: CommitRequest, epoch: int, version: int, payload: bytes | None, checksum: bytes | None, since: list[bytes]
) -> CommittedState | None:
    """The state that beat a stale commit, if its reply could name every step since."""
    steps = [step.decode() for step in since[::2]]
    versions = [int(float(score)) for score in since[1::2]]
    if payload is None or checksum is None or versions != list(range(version - len(steps) + 1, version + 1)):
        return None
    if len(steps) != version - request.expected_version:  # a commit without a step came between
        return None
    return CommittedState(request.context.context_id, version, epoch, tuple(steps), payload, checksum.decode())
