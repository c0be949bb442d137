"""Run bookkeeping in Redis: attempts per task, step outcomes, failure flag, L3 write count, completion.

These are reports about a run, not its state: the state is the RunContext. At finalize they are
copied into the run's row in L3 and given a TTL.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

RECORD_TTL_S = 7 * 24 * 3600
DONE_TOKENS = 16


@dataclass(frozen=True)
class StepStart:
    attempt: int  # how many times this task message has started (more than 1: it was redelivered)
    run_failed: bool


class RunRecords:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, run_id: str, part: str) -> str:
        return f"{self.prefix}:run:{run_id}:{part}"

    def start_step(self, run_id: str, task_id: str, step_id: str) -> StepStart:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hincrby(self._key(run_id, "attempts"), task_id, 1)
            pipe.hincrby(self._key(run_id, "step_attempts"), step_id, 1)
            pipe.get(self._key(run_id, "failed"))
            attempt, _, failed = pipe.execute()
        return StepStart(attempt=int(attempt), run_failed=failed is not None)

    def finish_step(self, run_id: str, step_id: str, *, status: str, worker: str, duration_s: float) -> None:
        record = {"status": status, "worker": worker, "duration_s": round(duration_s, 6), "finished_at": time.time()}
        self.client.hset(self._key(run_id, "steps"), step_id, json.dumps(record))

    def mark_failed(self, run_id: str, error: str) -> bool:
        """Flag the run as failed; True for the first flag (only that one finalizes)."""
        return bool(self.client.set(self._key(run_id, "failed"), error, nx=True, ex=RECORD_TTL_S))

    def count_l3_write(self, run_id: str, count: int = 1) -> None:
        self.client.incrby(self._key(run_id, "l3_writes"), count)

    def summary(self, run_id: str) -> dict[str, Any]:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._key(run_id, "steps"))
            pipe.hgetall(self._key(run_id, "step_attempts"))
            pipe.get(self._key(run_id, "l3_writes"))
            steps, attempts, l3_writes = pipe.execute()
        out = []
        for raw_id, raw in steps.items():
            step_id = raw_id.decode()
            record = json.loads(raw)
            out.append({"id": step_id, **record, "attempts": int(attempts.get(raw_id, 1))})
        out.sort(key=lambda step: step["finished_at"])
        return {"steps": out, "l3_writes": int(l3_writes or 0)}

    def announce_done(self, run_id: str) -> None:
        key = self._key(run_id, "done")
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.rpush(key, *["1"] * DONE_TOKENS)
            pipe.expire(key, 60)
            for part in ("attempts", "step_attempts", "steps", "failed", "l3_writes"):
                pipe.expire(self._key(run_id, part), RECORD_TTL_S)
            pipe.execute()

    def wait_done(self, run_id: str, timeout_s: float) -> bool:
        """Block until the run announces it is done, or the timeout; a wake-up, not the truth (L3 is)."""
        return self.client.blpop([self._key(run_id, "done")], timeout=max(timeout_s, 0.01)) is not None
