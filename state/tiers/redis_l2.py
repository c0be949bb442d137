"""L2 on Redis (one server, or a Redis Cluster), shared by every worker process. Key names come from
`state.keys`, scripts from `lua/`.

A context entry is a hash {v: version, e: epoch, c: checksum, d: payload, o: origin, n: applied
count}; the steps it holds are a sorted set beside it, so a step's commit adds one id instead of
rewriting the run's history (a commit costs the same at the 10,000th step as at the 10th), and n
lets a lost set be seen instead of trusted. Origin 'l' marks a live lineage (created, committed to,
or rebuilt by a rewind), 'f' a reader's copy filled from L3; steps only read and commit live
entries. A live entry has no TTL while its run goes on (losing it would cost a rewind); a reader's
copy, and a finished run's contexts, get the context TTL. The write-behind schedule (per shard, a
sorted set of due times and a hash of first-change times) lives beside the contexts, so any worker
can finish a flush that another one scheduled. Run records (attempts, step outcomes, the failure
flag, the done signal) are reports about a run, not its state: they get a TTL at finalize.

On a cluster every script touches the keys of one hash tag (a context's shard); a step's record,
which on one server rides in its commit, is then written beside it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.exceptions import ClusterDownError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from state.codec import DEFAULT_CODEC, Codec
from state.errors import (
    CommunicationFailure,
    ContextCorruption,
    LineageLost,
    VersionConflict,
)
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
from state.tiers.scripts import SCRIPTS, lua

T = TypeVar("T")

log = logging.getLogger(__name__)

RECORD_TTL_S = 7 * 24 * 3600  # run records live this long after their run finished
DONE_TOKENS = 16  # a run's done signal wakes this many waiters (each takes one token)
DONE_TTL_S = 60
STALE_STEPS_TOLD = 64  # a commit up to this many versions behind is told the steps it missed


class RedisTier:
    """L2 on one Redis: owns the keys of one prefix; every multi-key change is one Lua script.

    Promises: a commit is a compare-and-set (a stale writer gets VersionConflict, never a lost
    update); an entry that fails its checksum raises ContextCorruption instead of being served;
    Redis errors leave as CommunicationFailure.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        prefix: str,
        config: StateCacheConfig,
        codec: Codec = DEFAULT_CODEC,
        broadcast_commits: bool = True,
    ) -> None:
        self.client = client
        # On a cluster a script may only touch keys of one slot: a step's records then go separately.
        self.cluster = isinstance(client, RedisCluster)
        self.keys = RedisKeys(prefix)
        self.prefix = prefix
        self.context_ttl_s = config.l2_context_ttl_s
        self.config_ttl_s = config.l2_config_ttl_s
        self.update_max_bytes = config.l1_update_max_bytes
        self.codec = codec
        # Commits announce themselves on the control channel, so other processes drop older L1 copies
        # (or, for a small context, take the new version).
        self._commit_channel = self.keys.control_channel if broadcast_commits else ""
        self._scripts = {name: client.register_script(lua(name)) for name in SCRIPTS}
        self._committing = threading.local()  # each thread's connection for the commit script
        _TIERS.add(self)  # a forked child must not use its parent's (see _forget_connections)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisTier:
        return cls(connect(url), **kwargs)

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except (RedisConnectionError, RedisTimeoutError, ClusterDownError) as exc:
            raise CommunicationFailure("L2 (Redis)", exc) from exc

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return self._call(lambda: self._scripts[name](keys=keys, args=args))
        except ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            # Something overwrote one of our keys with another type: drop the context entry (L3
            # holds the authoritative copy) and let the caller treat it as lost.
            self._call(lambda: self.client.delete(keys[0]))
            raise ContextCorruption(keys[0], "the key holds another type of value") from None

    def _commit_script(self, keys: list[str], args: list[Any]) -> Any:
        """The commit script, every step's one round trip, by the shortest way redis-py has: a
        connection of the pool that each thread keeps for it, without the per-command retry and
        metrics hooks (~40 us of CPU a step). A connection that fails is dropped and the script
        sent once more on a new one (a commit cannot apply twice: its step id is in it); on a
        cluster, the client's own way."""
        if self.cluster:
            return self._script("commit", keys, args)
        script = self._scripts["commit"]
        conn = getattr(self._committing, "connection", None)
        if conn is None:  # kept checked out: the pool still closes it with the others
            conn = self._committing.connection = self.client.connection_pool.get_connection()
        for attempt in range(3):
            try:
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return conn.read_response()
            except NoScriptError:  # the server's script cache was flushed (a restart): load it again
                script.sha = self._call(lambda: self.client.script_load(script.script))
            except (RedisConnectionError, RedisTimeoutError) as exc:
                conn.disconnect()  # the next send connects it again
                if attempt:
                    raise CommunicationFailure("L2 (Redis)", exc) from exc
            except ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                self._call(lambda: self.client.delete(keys[0]))  # as `_script` does
                raise ContextCorruption(keys[0], "the key holds another type of value") from None
        raise CommunicationFailure("L2 (Redis)", RuntimeError("the commit script could not be loaded"))

    def _context_keys(self, context_id: str) -> list[str]:
        """The keys of one context, all in its shard: entry, applied steps, due set, first-change hash."""
        k = self.keys
        return [k.context(context_id), k.applied(context_id), k.write_behind_due(context_id), k.write_behind_first(context_id)]

    # ---- contexts ------------------------------------------------------------------------

    def get_context(self, context_id: str) -> StoredContext | None:
        key, applied_key, due_key, _ = self._context_keys(context_id)
        try:
            entry, applied, due, newest = self._call(
                lambda: self._scripts["read"](keys=[key, applied_key, due_key], args=[context_id, LAST_STEPS_KEPT])
            )
        except ResponseError as exc:
            raise ContextCorruption(key, f"not a context entry ({exc})") from None
        version, stored_sum, payload, origin, count = entry
        if version is None and payload is None:
            return None
        if version is None or stored_sum is None or payload is None:
            raise ContextCorruption(key, "entry is missing its version, checksum or payload")
        if not self.codec.verify(payload, stored_sum.decode(), where=key):
            raise ContextCorruption(key, "checksum does not match payload")
        if _count(count, 0) != len(applied):
            raise ContextCorruption(key, f"holds {_count(count, 0)} applied steps, its set {len(applied)}")
        ctx = self.codec.load_state(payload, [step.decode() for step in applied], key=key)
        if ctx.version != int(version):
            raise ContextCorruption(key, f"payload holds version {ctx.version}, entry says {int(version)}")
        ctx.take_last_steps([(int(float(score)), step.decode()) for step, score in zip(newest[::2], newest[1::2])])
        return StoredContext(context=ctx, version=ctx.version, dirty=due is not None, live=origin == b"l")

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
        if outbox is not None and (report is None or self.cluster):
            raise ValueError("an outbox message rides only in a step's commit on one Redis (see carries_outbox)")
        payload, payload_checksum = encoded or self.encode_state(ctx)
        keys = self._context_keys(ctx.context_id)
        # A commit that pushes what follows it is not broadcast: that message carries the state to
        # the one process that needs it (or that process reads it), instead of waking every process.
        channel = "" if outbox is not None else self._commit_channel
        args: list[Any] = [
            expected_version, ctx.version, payload, payload_checksum, now, debounce_s, max_delay_s,
            ctx.context_id, channel, -1 if expected_epoch is None else expected_epoch, ctx.epoch,
            "1" if require_live else "0", step_id or "", "", RECORD_TTL_S,
            # A broadcast is pub/sub, in clear: a context with sensitive values never rides in it.
            0 if ctx.holds_sensitive else self.update_max_bytes, "", STALE_STEPS_TOLD,
        ]
        together = report is not None and not self.cluster
        if together:  # the step's record rides in the same script: one round trip
            assert report is not None
            run_id = report.run_id
            keys += [self._record(run_id, "steps", report.step_id), self._record(run_id, "progress"), self._record(run_id, "failed")]
            args[13] = json.dumps(report.record(now))
            if outbox is not None:
                keys.append(outbox.queue)
                args[16] = outbox.message
        elif report is not None and self.run_failed(report.run_id):  # on a cluster the flag lives elsewhere
            return CommitResult.RUN_FAILED
        status, actual, *stale = self._commit_script(keys, args)
        if status == 0:
            # The script checked the entry's epoch first: a stale step commit was of the entry's epoch.
            newer = self._newer(ctx, expected_epoch, int(actual), *stale) if stale and expected_epoch is not None else None
            raise VersionConflict("L2", keys[0], expected_version, int(actual), newer)
        if status == -2:
            raise LineageLost(ctx.context_id, "the L2 entry is of another epoch, or not a live lineage")
        if status == -3:
            self.evict_context(ctx.context_id)
            raise LineageLost(ctx.context_id, "the L2 entry was damaged")
        result = CommitResult(status)
        if result is CommitResult.COMMITTED and report is not None and not together:
            self.finish_step(report.run_id, report.step_id, record=report.record(now))
        return result

    @staticmethod
    def _newer(
        ctx: RunContext, epoch: int, version: int, payload: bytes | None, checksum: bytes | None, since: list[bytes]
    ) -> CommittedState | None:
        """The state that beat a stale commit of ``ctx``, if its reply could name every step since."""
        steps = [step.decode() for step in since[::2]]
        versions = [int(float(score)) for score in since[1::2]]
        if payload is None or checksum is None or versions != list(range(version - len(steps) + 1, version + 1)):
            return None
        if len(steps) != version - (ctx.version - 1):  # a commit without a step came between
            return None
        return CommittedState(ctx.context_id, version, epoch, tuple(steps), payload, checksum.decode())

    @property
    def carries_outbox(self) -> bool:
        # On a cluster the broker's queue is on no context's shard.
        return not self.cluster

    def shares_server_with(self, client: redis.Redis) -> bool:
        """Whether ``client`` (e.g. the broker's) talks to the same Redis server and database as this
        tier, so that a commit's outbox lands in the broker's queue: asked of the servers (a key
        written here is read there), not guessed from their URLs."""
        if self.cluster:
            return False
        key = self.keys.server_token(os.urandom(8).hex())
        try:
            self.client.set(key, "1", ex=30)
            same = bool(client.get(key))
            self.client.delete(key)
        except redis.RedisError:
            return False
        return same

    def encode_state(self, ctx: RunContext) -> tuple[bytes, str]:
        payload = self.codec.dump_state(ctx)
        return payload, self.codec.checksum(payload)

    def decode_state(self, payload: bytes, payload_checksum: str, applied: list[str], *, key: str) -> RunContext:
        if not self.codec.verify(payload, payload_checksum, where=key):
            raise ContextCorruption(key, "checksum does not match payload")
        return self.codec.load_state(payload, applied, key=key)

    def fill_context(self, ctx: RunContext, *, live: bool = False) -> bool:
        payload = self.codec.dump_state(ctx)
        ttl = 0 if live else self.context_ttl_s
        key, applied_key = self._context_keys(ctx.context_id)[:2]
        return bool(
            self._script(
                "fill",
                [key, applied_key],
                [ctx.version, payload, self.codec.checksum(payload), ttl, ctx.epoch, "l" if live else "f", *ctx.applied_steps],
            )
        )

    def mark_flushed(
        self, context_id: str, version: int, *, now: float, debounce_s: float, epoch: int = 1, expire: bool = True
    ) -> bool:
        ttl = self.context_ttl_s if expire else 0
        return bool(
            self._script(
                "mark_flushed", self._context_keys(context_id), [version, ttl, context_id, now, debounce_s, epoch]
            )
        )

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

    def config_keys(self) -> list[str]:
        start = len(self.keys.config(""))
        return [key.decode()[start:] for key in self._call(lambda: list(self.client.scan_iter(match=self.keys.config("*"), count=1000)))]

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
        due_sets = [key for key, count in zip(self.keys.due_sets(), counts) if count]
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

    # ---- routine definitions and configurations --------------------------------------------

    def get_config(self, key: str) -> ConfigEntry | None:
        redis_key = self.keys.config(key)
        version, stored_sum, payload = self._call(lambda: self.client.hmget(redis_key, "v", "c", "d"))
        if payload is None:
            return None
        if version is None or stored_sum is None or not self.codec.verify(payload, stored_sum.decode(), where=redis_key):
            self._call(lambda: self.client.delete(redis_key))
            raise ContextCorruption(redis_key, "checksum does not match payload")
        return ConfigEntry(key=key, version=int(version), data=self.codec.load_document(payload, key=redis_key))

    def put_config(self, entry: ConfigEntry) -> None:
        payload = self.codec.dump_document(entry.data)
        redis_key = self.keys.config(entry.key)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(redis_key, mapping={"v": entry.version, "c": self.codec.checksum(payload), "d": payload})
            pipe.expire(redis_key, self.config_ttl_s)
            self._call(pipe.execute)

    def evict_config(self, key: str) -> bool:
        return bool(self._call(lambda: self.client.delete(self.keys.config(key))))

    # ---- run records --------------------------------------------------------------------------

    def _record(self, run_id: str, part: str, step_id: str = "") -> str:
        return self.keys.run_record(run_id, part, step_id)

    def _records(self, run_id: str, keys: list[str], operation: Callable[[], T]) -> T:
        """Run a records operation; if a record holds garbage, drop those records and try once more.

        Records are reports that the run rebuilds as it goes on, so a damaged one is dropped, never
        raised out of a task.
        """
        try:
            return self._call(operation)
        except ResponseError as exc:
            log.error("run %s: dropping damaged run records %s (%s)", run_id, ", ".join(keys), exc)
            for key in keys:  # one by one: on a cluster they live in different slots
                self._call(lambda: self.client.delete(key))
            return self._call(operation)

    def start_step(self, run_id: str, task_id: str, step_id: str) -> StepStart:
        """Count a start that is not a message's first (a redelivery or a retry): the first is never
        counted, so this one is attempt count + 1."""
        attempts, step_attempts, failed = (
            self._record(run_id, "attempts"), self._record(run_id, "step_attempts"), self._record(run_id, "failed")
        )

        def start() -> tuple[Any, ...]:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hincrby(attempts, task_id, 1)
                pipe.hincrby(step_attempts, step_id, 1)
                pipe.exists(failed)
                return tuple(pipe.execute())

        attempt, _, run_failed = self._records(run_id, [attempts, step_attempts], start)
        return StepStart(attempt=int(attempt) + 1, run_failed=bool(run_failed))

    def run_failed(self, run_id: str) -> bool:
        return bool(self._call(lambda: self.client.exists(self._record(run_id, "failed"))))

    def finish_step(
        self, run_id: str, step_id: str, *, status: str = "failed", worker: str = "?", duration_s: float = 0.0,
        traceback: str | None = None, record: dict[str, Any] | None = None,
    ) -> None:
        if record is None:
            record = {"status": status, "worker": worker, "duration_s": round(duration_s, 6), "finished_at": time.time()}
            if traceback:
                record["traceback"] = traceback
        now = record["finished_at"]
        steps, progress = self._record(run_id, "steps", step_id), self._record(run_id, "progress")

        def finish() -> None:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hset(steps, step_id, json.dumps(record))
                pipe.set(progress, repr(now), ex=RECORD_TTL_S)
                pipe.execute()

        self._records(run_id, [steps, progress], finish)

    def touch_progress(self, run_ids: list[str], now: float) -> None:
        if not run_ids:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.set(self._record(run_id, "progress"), repr(now), ex=RECORD_TTL_S)
            self._call(pipe.execute)

    def progress_of(self, run_ids: list[str]) -> dict[str, float | None]:
        if not run_ids:
            return {}
        with self.client.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.get(self._record(run_id, "progress"))
            raw = self._call(lambda: pipe.execute(raise_on_error=False))
        out: dict[str, float | None] = {}
        for run_id, value in zip(run_ids, raw):
            try:
                out[run_id] = None if value is None else float(value)
            except (ValueError, TypeError):  # garbage: as good as no record
                out[run_id] = None
        return out

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        return bool(self._script("lease", [self.keys.lease(name)], [holder, int(ttl_s * 1000)]))

    def keep_hidden_error(self, run_id: str, sealed: dict[str, str]) -> None:
        key = self._record(run_id, "hidden_error")
        self._call(lambda: self.client.set(key, json.dumps(sealed), nx=True, ex=RECORD_TTL_S))

    def announce_routine(self, routine: str, version: int) -> None:
        if self._commit_channel:
            message = json.dumps({"type": "routine", "routine": routine, "version": version})
            self._call(lambda: self.client.publish(self._commit_channel, message))

    def mark_failed(self, run_id: str, error: str) -> bool:
        """Flag the run as failed; True for the first flag (only that one finalizes), which is
        announced on the control channel so that no process starts more of the run's steps."""
        first = bool(self._call(lambda: self.client.set(self._record(run_id, "failed"), error, nx=True, ex=RECORD_TTL_S)))
        if first and self._commit_channel:
            self._call(lambda: self.client.publish(self._commit_channel, json.dumps({"type": "run_ended", "run": run_id})))
        return first

    def failure_of(self, run_id: str) -> str | None:
        try:
            raw = self._call(lambda: self.client.get(self._record(run_id, "failed")))
        except ResponseError:  # not a string: damaged; the run still failed
            return "the run failed (its error record was damaged)"
        return None if raw is None else raw.decode(errors="replace")

    def forget_run(self, run_id: str) -> None:
        for key in self.keys.run_records(run_id):  # one by one: on a cluster they live in different slots
            self._call(lambda: self.client.delete(key))

    def count_l3_write(self, run_id: str, count: int = 1) -> None:
        key = self._record(run_id, "l3_writes")
        self._records(run_id, [key], lambda: self.client.incrby(key, count))

    def run_summary(self, run_id: str) -> dict[str, Any]:
        step_keys = self.keys.step_records(run_id)
        step_attempts, l3_writes = self._record(run_id, "step_attempts"), self._record(run_id, "l3_writes")
        hidden = self._record(run_id, "hidden_error")

        def read() -> list[Any]:
            with self.client.pipeline(transaction=False) as pipe:
                for key in step_keys:
                    pipe.hgetall(key)
                pipe.hgetall(step_attempts)
                pipe.get(l3_writes)
                pipe.get(hidden)
                return pipe.execute()

        *step_parts, attempts, writes, hidden_error = self._records(
            run_id, [*step_keys, step_attempts, l3_writes, hidden], read
        )
        out = []
        for steps in step_parts:
            for (raw_id, raw), record in zip(steps.items(), _step_records(list(steps.values()))):
                if record is None:
                    log.error("run %s: dropping the damaged record of step %r", run_id, raw_id[:100])
                    continue
                counted = attempts.get(raw_id)  # starts after the first, if any were counted
                record["attempts"] = max(record.get("attempts", 1), 1 if counted is None else _count(counted) + 1)
                out.append({"id": raw_id.decode(errors="replace"), **record})
        out.sort(key=lambda step: step["finished_at"])
        summary: dict[str, Any] = {"steps": out, "l3_writes": _count(writes, 0)}
        try:
            if hidden_error is not None:
                summary["hidden_error"] = json.loads(hidden_error)
        except ValueError:
            pass  # damaged: a report, dropped
        return summary

    def announce_done(self, run_id: str) -> None:
        done = self._record(run_id, "done")
        with self.client.pipeline(transaction=not self.cluster) as pipe:
            pipe.delete(done)
            pipe.rpush(done, *["1"] * DONE_TOKENS)
            pipe.expire(done, DONE_TTL_S)
            for key in self.keys.run_records(run_id):
                if key != done:
                    pipe.expire(key, RECORD_TTL_S)
            self._call(pipe.execute)

    def wait_done(self, run_id: str, timeout_s: float) -> bool:
        """Block until the run announces it is done, or the timeout; a wake-up, not the truth (L3 is)."""
        done = self._record(run_id, "done")
        try:
            return self._call(lambda: self.client.blpop([done], timeout=max(timeout_s, 0.01))) is not None
        except ResponseError:  # garbage where the signal should be: drop it, the caller asks L3
            self._call(lambda: self.client.delete(done))
            return False

    def ping(self) -> bool:
        return bool(self._call(self.client.ping))

    def close(self) -> None:
        self.client.close()


_TIERS: weakref.WeakSet[RedisTier] = weakref.WeakSet()


def _forget_connections() -> None:
    """In a forked child: the connections tiers keep for their commit script are the parent's
    sockets; the child's first commit opens its own (redis-py's pool does the same for its own)."""
    for tier in list(_TIERS):
        tier._committing = threading.local()


os.register_at_fork(after_in_child=_forget_connections)


def connect(url: str) -> redis.Redis | RedisCluster:
    """A client for the Redis at ``url``; a cluster client when that server is a node of a cluster."""
    # Named connections: CLIENT LIST shows which process holds which (runctx-<pid>).
    options: dict[str, Any] = {"socket_timeout": 10, "client_name": f"runctx-{os.getpid()}"}
    client = redis.Redis.from_url(url, health_check_interval=30, **options)
    try:
        enabled = client.info("cluster").get("cluster_enabled")
    except (RedisConnectionError, RedisTimeoutError, ResponseError):
        return client  # not reachable now: a plain server is the likelier; calls will say if it is down
    if not enabled:
        return client
    client.close()
    return RedisCluster.from_url(url, **options)


def is_cluster(url: str) -> bool:
    """Whether the Redis at ``url`` is a node of a Redis Cluster (False if it cannot be reached)."""
    client = connect(url)
    try:
        return isinstance(client, RedisCluster)
    finally:
        client.close()


_STEP_FIELDS = {"status": str, "worker": str, "duration_s": (int, float), "finished_at": (int, float)}


def _step_records(raws: list[bytes]) -> list[dict[str, Any] | None]:
    """Many step records at once: one JSON parse of them all (a 10,000-step run's summary is read
    at its finalize), one by one only if one of them is damaged."""
    try:
        records = json.loads(b"[" + b",".join(raws) + b"]")
        if len(records) != len(raws):  # a record that was two values
            raise ValueError("not one value per record")
    except (ValueError, UnicodeDecodeError):
        return [_step_record(raw) for raw in raws]
    return [_checked_record(record) for record in records]


def _step_record(raw: bytes) -> dict[str, Any] | None:
    """A step record as stored by a step's commit or ``finish_step``, or None if it is damaged."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return _checked_record(record)


def _checked_record(record: Any) -> dict[str, Any] | None:
    if not isinstance(record, dict) or any(not isinstance(record.get(name), kind) for name, kind in _STEP_FIELDS.items()):
        return None
    out = {name: record[name] for name in _STEP_FIELDS}
    if isinstance(record.get("attempts"), int) and record["attempts"] >= 1:
        out["attempts"] = record["attempts"]
    if isinstance(record.get("traceback"), str):
        out["traceback"] = record["traceback"]
    return out


def _count(raw: bytes | None, default: int = 1) -> int:
    try:
        return default if raw is None else int(raw)
    except ValueError:
        return default
