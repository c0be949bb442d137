"""L2's run records on Redis: reports about a run (attempts, step outcomes, the failed flag, the
hidden error, L3 write counts, progress, the done signal), not its state. They get a TTL when the
run finishes. A damaged record is dropped, never raised out of a task: the run rebuilds it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis.exceptions import ResponseError

from state import bus
from state.tiers.data import StepStart, watch_message
from state.tiers.redis.bus import RedisBus
from state.tiers.redis.connection import as_count
from state.tiers.redis.contexts import RECORD_TTL_S

T = TypeVar("T")

log = logging.getLogger(__name__)

DONE_TOKENS = 16  # a run's done signal wakes this many waiters (each takes one token)
DONE_TTL_S = 60


class RedisRunRecords(RedisBus):
    """`L2RunRecords` on Redis; the first failed flag of a run is also announced on the bus."""

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

    def start_fan_out(self, run_id: str, fan_out: str, total: int, ended: dict[int, bool] | None = None) -> int:
        key = self._record(run_id, "fan_outs", fan_out)
        pairs = [value for index, failed in sorted((ended or {}).items()) for value in (index, "1" if failed else "0")]
        replace = "1" if ended is not None else "0"
        return int(self._records(run_id, [key], lambda: self._script("start_fan_out", [key], [total, RECORD_TTL_S, replace, *pairs])))

    def end_item(self, run_id: str, fan_out: str, item: int, failed: bool) -> tuple[int, int, int]:
        key = self._record(run_id, "fan_outs", fan_out)
        rank, total, failures = self._records(
            run_id, [key], lambda: self._script("end_item", [key], [item, "1" if failed else "0", RECORD_TTL_S])
        )
        return int(rank), int(total), int(failures)

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

    def keep_hidden_error(self, run_id: str, sealed: dict[str, str]) -> None:
        key = self._record(run_id, "hidden_error")
        self._call(lambda: self.client.set(key, json.dumps(sealed), nx=True, ex=RECORD_TTL_S))

    def mark_failed(self, run_id: str, error: str) -> bool:
        """Flag the run as failed; True for the first flag (only that one finalizes), which is
        announced on the control channel so that no process starts more of the run's steps."""
        first = bool(self._call(lambda: self.client.set(self._record(run_id, "failed"), error, nx=True, ex=RECORD_TTL_S)))
        if first:
            self.publish(bus.RunEnded(run_id))
        return first

    def failure_of(self, run_id: str) -> str | None:
        try:
            raw = self._call(lambda: self.client.get(self._record(run_id, "failed")))
        except ResponseError:  # not a string: damaged; the run still failed
            return "the run failed (its error record was damaged)"
        return None if raw is None else raw.decode(errors="replace")

    def reopen_records(self, run_id: str) -> None:
        for part in ("failed", "hidden_error", "done"):
            key = self._record(run_id, part)
            self._call(lambda key=key: self.client.delete(key))
        self.publish(bus.RunResumed(run_id))

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
                record["attempts"] = max(record.get("attempts", 1), 1 if counted is None else as_count(counted) + 1)
                out.append({"id": raw_id.decode(errors="replace"), **record})
        out.sort(key=lambda step: step["finished_at"])
        summary: dict[str, Any] = {"steps": out, "l3_writes": as_count(writes, 0)}
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
        self._call(lambda: self.client.publish(self.keys.watch_channel, watch_message(run_id, "", status="ended")))

    def wait_done(self, run_id: str, timeout_s: float) -> bool:
        """Block until the run announces it is done, or the timeout; a wake-up, not the truth (L3 is)."""
        done = self._record(run_id, "done")
        try:
            return self._call(lambda: self.client.blpop([done], timeout=max(timeout_s, 0.01))) is not None
        except ResponseError:  # garbage where the signal should be: drop it, the caller asks L3
            self._call(lambda: self.client.delete(done))
            return False


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
    for name in ("traceback", "reason"):
        if isinstance(record.get(name), str):
            out[name] = record[name]
    if isinstance(record.get("retry_in_s"), (int, float)) and not isinstance(record["retry_in_s"], bool):
        out["retry_in_s"] = record["retry_in_s"]
    return out
