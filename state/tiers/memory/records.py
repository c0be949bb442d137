"""The in-memory twin's routine definitions and configurations, run records, bus and leases."""

from __future__ import annotations

import json
from typing import Any

from state.errors import ContextCorruption
from state.tiers.data import ConfigEntry, StepStart
from state.tiers.memory.base import Entry, MemoryState


class MemoryConfigs(MemoryState):
    """`L2Configs` in memory."""

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
            self._configs[entry.key] = Entry(entry.version, self.codec.checksum(payload), payload, self.clock() + self.config.l2_config_ttl_s)

    def evict_config(self, key: str) -> bool:
        with self._lock:
            return self._configs.pop(key, None) is not None

    def config_keys(self) -> list[str]:
        with self._lock:
            return [key for key in list(self._configs) if self._live(self._configs, key)]


class MemoryRunRecords(MemoryState):
    """`L2RunRecords`, `L2Bus` (nobody else listens) and `L2Leases` in memory."""

    def start_step(self, run_id: str, task_id: str, step_id: str) -> StepStart:
        with self._lock:
            run = self._run(run_id)
            run.attempts[task_id] = run.attempts.get(task_id, 0) + 1
            run.step_attempts[step_id] = run.step_attempts.get(step_id, 0) + 1
            return StepStart(attempt=run.attempts[task_id] + 1, run_failed=run.failed is not None)

    def start_fan_out(self, run_id: str, fan_out: str, total: int, ended: dict[int, bool] | None = None) -> int:
        with self._lock:
            run = self._run(run_id)
            if ended is None and fan_out in run.fan_outs:
                return len(run.fan_outs[fan_out][1])
            ranks = {index: (rank, failed) for rank, (index, failed) in enumerate(sorted((ended or {}).items()), 1)}
            run.fan_outs[fan_out] = (total, ranks)
            return len(ranks)

    def end_item(self, run_id: str, fan_out: str, item: int, failed: bool) -> tuple[int, int, int]:
        with self._lock:
            run = self._run(run_id)
            if fan_out not in run.fan_outs:
                return 0, 0, 0
            total, ranks = run.fan_outs[fan_out]
            if item not in ranks:
                ranks[item] = (len(ranks) + 1, failed)
            return ranks[item][0], total, sum(1 for _, was_failed in ranks.values() if was_failed)

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

    def publish(self, message: Any) -> int:
        return 0  # one process: nobody else listens

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

    def reopen_records(self, run_id: str) -> None:
        with self._lock:
            run = self._run(run_id)
            run.failed, run.hidden_error, run.done = None, None, False

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

    def count_heartbeat(self) -> int:
        with self._lock:
            self._heartbeats += 1
            return self._heartbeats

    def note_loss(self, at: float, ttl_s: float) -> None:
        with self._lock:
            if self._loss is None or self._loss[1] <= self.clock():
                self._loss = (at, self.clock() + ttl_s)

    def claim_loss_resume(self, run_id: str, ttl_s: float) -> bool:
        with self._lock:
            if self._loss_claims.get(run_id, 0.0) > self.clock():
                return False
            self._loss_claims[run_id] = self.clock() + ttl_s
            return True

    def loss_noted(self) -> float | None:
        with self._lock:
            return None if self._loss is None or self._loss[1] <= self.clock() else self._loss[0]

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        with self._lock:
            current = self._leases.get(name)
            if current is None or current[0] == holder or current[1] <= self.clock():
                self._leases[name] = (holder, self.clock() + ttl_s)
                return True
            return False
