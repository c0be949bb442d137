"""L2 on Redis, shared by every worker process. Key names come from `state.keys`, scripts from `lua/`.

A context entry is a hash {v: version, e: epoch, c: checksum, d: payload, o: origin}. Origin 'l'
marks a live lineage (created, committed to, or rebuilt by a rewind), 'f' a reader's copy filled
from L3; steps only read and commit live entries. A live entry has no TTL while its run goes on
(losing it would cost a rewind); a reader's copy, and a finished run's contexts, get the context TTL. The write-behind
schedule (a sorted set of due times and a hash of first-change times) lives in Redis too, so any
worker can finish a flush that another one scheduled. Run records (attempts, step outcomes, the
failure flag, the done signal) are reports about a run, not its state: they get a TTL at finalize.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, TypeVar

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from state.codec import DEFAULT_CODEC, Codec, checksum
from state.errors import CommunicationFailure, ContextCorruption, LineageLost, VersionConflict
from state.keys import RUN_RECORD_PARTS, RedisKeys
from state.models import RunContext, StateCacheConfig
from state.tiers.contracts import ConfigEntry, StepReport, StepStart, StoredContext
from state.tiers.scripts import SCRIPTS, lua

T = TypeVar("T")

log = logging.getLogger(__name__)

RECORD_TTL_S = 7 * 24 * 3600  # run records live this long after their run finished
DONE_TOKENS = 16  # a run's done signal wakes this many waiters (each takes one token)
DONE_TTL_S = 60


class RedisTier:
    """L2 on one Redis: owns the keys of one prefix; every multi-key change is one Lua script.

    Promises: a commit is a compare-and-set (a stale writer gets VersionConflict, never a lost
    update); an entry that fails its checksum raises ContextCorruption instead of being served;
    Redis errors leave as CommunicationFailure.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str,
        config: StateCacheConfig,
        codec: Codec = DEFAULT_CODEC,
        broadcast_commits: bool = True,
    ) -> None:
        self.client = client
        self.keys = RedisKeys(prefix)
        self.prefix = prefix
        self.context_ttl_s = config.l2_context_ttl_s
        self.config_ttl_s = config.l2_config_ttl_s
        self.codec = codec
        # Commits announce themselves on the control channel, so other processes drop older L1 copies.
        self._commit_channel = self.keys.control_channel if broadcast_commits else ""
        self._scripts = {name: client.register_script(lua(name)) for name in SCRIPTS}

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "RedisTier":
        # Named connections: CLIENT LIST shows which process holds which (runctx-<pid>).
        client = redis.Redis.from_url(url, socket_timeout=10, health_check_interval=30, client_name=f"runctx-{os.getpid()}")
        return cls(client, **kwargs)

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except (RedisConnectionError, RedisTimeoutError) as exc:
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

    def _schedule_keys(self, context_id: str) -> list[str]:
        return [self.keys.context(context_id), self.keys.write_behind_due, self.keys.write_behind_first]

    # ---- contexts ------------------------------------------------------------------------

    def get_context(self, context_id: str) -> StoredContext | None:
        key = self.keys.context(context_id)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hmget(key, "v", "c", "d", "o")
                pipe.zscore(self.keys.write_behind_due, context_id)
                (version, stored_sum, payload, origin), due = self._call(pipe.execute)
        except ResponseError as exc:
            raise ContextCorruption(key, f"not a context entry ({exc})") from None
        if version is None and payload is None:
            return None
        if version is None or stored_sum is None or payload is None:
            raise ContextCorruption(key, "entry is missing its version, checksum or payload")
        if checksum(payload) != stored_sum.decode():
            raise ContextCorruption(key, "checksum does not match payload")
        ctx = self.codec.load_context(payload, key=key)
        if ctx.version != int(version):
            raise ContextCorruption(key, f"payload holds version {ctx.version}, entry says {int(version)}")
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
        report: StepReport | None = None,
    ) -> bool:
        payload = self.codec.dump_context(ctx)
        keys = self._schedule_keys(ctx.context_id)
        args: list[Any] = [
            expected_version, ctx.version, payload, checksum(payload), now, debounce_s, max_delay_s,
            ctx.context_id, self._commit_channel, -1 if expected_epoch is None else expected_epoch, ctx.epoch,
            "1" if require_live else "0",
        ]
        if report is not None:  # the step record rides in the same script: one round trip
            keys += [self._record(report.run_id, "steps"), self._record(report.run_id, "progress")]
            args += [report.step_id, json.dumps(report.record(now)), RECORD_TTL_S]
        status, actual = self._script("commit", keys, args)
        if status == 0:
            raise VersionConflict("L2", self.keys.context(ctx.context_id), expected_version, int(actual))
        if status == -2:
            raise LineageLost(ctx.context_id, "the L2 entry is of another epoch, or not a live lineage")
        if status == -3:
            self.evict_context(ctx.context_id)
            raise LineageLost(ctx.context_id, "the L2 entry was damaged")
        return status == 1

    def fill_context(self, ctx: RunContext, *, live: bool = False) -> bool:
        payload = self.codec.dump_context(ctx)
        ttl = 0 if live else self.context_ttl_s
        return bool(
            self._script(
                "fill",
                [self.keys.context(ctx.context_id)],
                [ctx.version, payload, checksum(payload), ttl, ctx.epoch, "l" if live else "f"],
            )
        )

    def mark_flushed(
        self, context_id: str, version: int, *, now: float, debounce_s: float, epoch: int = 1, expire: bool = True
    ) -> bool:
        ttl = self.context_ttl_s if expire else 0
        return bool(
            self._script(
                "mark_flushed", self._schedule_keys(context_id), [version, ttl, context_id, now, debounce_s, epoch]
            )
        )

    def evict_context(self, context_id: str, up_to_version: int | None = None) -> bool:
        return bool(
            self._script("evict", self._schedule_keys(context_id), [-1 if up_to_version is None else up_to_version, context_id])
        )

    def due_time(self, context_id: str) -> float | None:
        return self._call(lambda: self.client.zscore(self.keys.write_behind_due, context_id))

    def claim_due(self, now: float, *, lease_s: float, limit: int = 100) -> list[str]:
        ids = self._script("claim_due", [self.keys.write_behind_due], [now, lease_s, limit])
        return [raw.decode() for raw in ids]

    def pending_flushes(self) -> int:
        return int(self._call(lambda: self.client.zcard(self.keys.write_behind_due)))

    def next_due(self) -> float | None:
        first = self._call(lambda: self.client.zrange(self.keys.write_behind_due, 0, 0, withscores=True))
        return first[0][1] if first else None

    # ---- routine definitions and configurations --------------------------------------------

    def get_config(self, key: str) -> ConfigEntry | None:
        redis_key = self.keys.config(key)
        version, stored_sum, payload = self._call(lambda: self.client.hmget(redis_key, "v", "c", "d"))
        if payload is None:
            return None
        if version is None or stored_sum is None or checksum(payload) != stored_sum.decode():
            self._call(lambda: self.client.delete(redis_key))
            raise ContextCorruption(redis_key, "checksum does not match payload")
        return ConfigEntry(key=key, version=int(version), data=self.codec.load_document(payload, key=redis_key))

    def put_config(self, entry: ConfigEntry) -> None:
        payload = self.codec.dump_document(entry.data)
        redis_key = self.keys.config(entry.key)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(redis_key, mapping={"v": entry.version, "c": checksum(payload), "d": payload})
            pipe.expire(redis_key, self.config_ttl_s)
            self._call(pipe.execute)

    def evict_config(self, key: str) -> bool:
        return bool(self._call(lambda: self.client.delete(self.keys.config(key))))

    # ---- run records --------------------------------------------------------------------------

    def _record(self, run_id: str, part: str) -> str:
        return self.keys.run_record(run_id, part)

    def _records(self, run_id: str, parts: tuple[str, ...], operation: Callable[[], T]) -> T:
        """Run a records operation; if a record holds garbage, drop those records and try once more.

        Records are reports that the run rebuilds as it goes on, so a damaged one is dropped, never
        raised out of a task.
        """
        try:
            return self._call(operation)
        except ResponseError as exc:
            log.error("run %s: dropping damaged run records %s (%s)", run_id, ", ".join(parts), exc)
            self._call(lambda: self.client.delete(*(self._record(run_id, part) for part in parts)))
            return self._call(operation)

    def start_step(self, run_id: str, task_id: str, step_id: str) -> StepStart:
        def start() -> tuple[Any, ...]:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hincrby(self._record(run_id, "attempts"), task_id, 1)
                pipe.hincrby(self._record(run_id, "step_attempts"), step_id, 1)
                pipe.exists(self._record(run_id, "failed"))
                return tuple(pipe.execute())

        attempt, _, failed = self._records(run_id, ("attempts", "step_attempts"), start)
        return StepStart(attempt=int(attempt), run_failed=bool(failed))

    def finish_step(self, run_id: str, step_id: str, *, status: str, worker: str, duration_s: float) -> None:
        now = time.time()
        record = {"status": status, "worker": worker, "duration_s": round(duration_s, 6), "finished_at": now}

        def finish() -> None:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hset(self._record(run_id, "steps"), step_id, json.dumps(record))
                pipe.set(self._record(run_id, "progress"), repr(now), ex=RECORD_TTL_S)
                pipe.execute()

        self._records(run_id, ("steps", "progress"), finish)

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
        raw = self._call(lambda: self.client.mget([self._record(run_id, "progress") for run_id in run_ids]))
        out: dict[str, float | None] = {}
        for run_id, value in zip(run_ids, raw):
            try:
                out[run_id] = None if value is None else float(value)
            except ValueError:  # garbage: as good as no record
                out[run_id] = None
        return out

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        return bool(self._script("lease", [self.keys.lease(name)], [holder, int(ttl_s * 1000)]))

    def mark_failed(self, run_id: str, error: str) -> bool:
        """Flag the run as failed; True for the first flag (only that one finalizes)."""
        return bool(self._call(lambda: self.client.set(self._record(run_id, "failed"), error, nx=True, ex=RECORD_TTL_S)))

    def failure_of(self, run_id: str) -> str | None:
        try:
            raw = self._call(lambda: self.client.get(self._record(run_id, "failed")))
        except ResponseError:  # not a string: damaged; the run still failed
            return "the run failed (its error record was damaged)"
        return None if raw is None else raw.decode(errors="replace")

    def count_l3_write(self, run_id: str, count: int = 1) -> None:
        self._records(run_id, ("l3_writes",), lambda: self.client.incrby(self._record(run_id, "l3_writes"), count))

    def run_summary(self, run_id: str) -> dict[str, Any]:
        def read() -> tuple[Any, ...]:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._record(run_id, "steps"))
                pipe.hgetall(self._record(run_id, "step_attempts"))
                pipe.get(self._record(run_id, "l3_writes"))
                return tuple(pipe.execute())

        steps, attempts, l3_writes = self._records(run_id, ("steps", "step_attempts", "l3_writes"), read)
        out = []
        for raw_id, raw in steps.items():
            record = _step_record(raw)
            if record is None:
                log.error("run %s: dropping the damaged record of step %r", run_id, raw_id[:100])
                continue
            out.append({"id": raw_id.decode(errors="replace"), **record, "attempts": _count(attempts.get(raw_id))})
        out.sort(key=lambda step: step["finished_at"])
        return {"steps": out, "l3_writes": _count(l3_writes, 0)}

    def announce_done(self, run_id: str) -> None:
        done = self._record(run_id, "done")
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(done)
            pipe.rpush(done, *["1"] * DONE_TOKENS)
            pipe.expire(done, DONE_TTL_S)
            for part in RUN_RECORD_PARTS:
                if part != "done":
                    pipe.expire(self._record(run_id, part), RECORD_TTL_S)
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


_STEP_FIELDS = {"status": str, "worker": str, "duration_s": (int, float), "finished_at": (int, float)}


def _step_record(raw: bytes) -> dict[str, Any] | None:
    """A step record as stored by ``finish_step``, or None if it is damaged."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or any(not isinstance(record.get(name), kind) for name, kind in _STEP_FIELDS.items()):
        return None
    return {name: record[name] for name in _STEP_FIELDS}


def _count(raw: bytes | None, default: int = 1) -> int:
    try:
        return default if raw is None else int(raw)
    except ValueError:
        return default
