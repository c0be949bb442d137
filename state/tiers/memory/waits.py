"""The in-memory twin of L3's waits and signals (`state.tiers.postgres.waits`), under the L3 twin's lock."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from typing import Any

from state.errors import InvalidValue, NotFound, RunEnded, SignalRefused
from state.tiers.data import FINAL_STATUSES, RunRow, SignalReceipt, WaitRow


class MemoryWaits:
    """Waits by (run, step) and signals by (run, event). Promises what `PostgresWaits` promises."""

    _lock: threading.RLock
    _runs: dict[str, RunRow]
    writes: int

    def _init_waits(self) -> None:
        self._waits: dict[tuple[str, str], WaitRow] = {}
        self._signals: dict[tuple[str, str], dict[str, Any]] = {}  # payload (JSON text), sensitivity, consumed_by

    def arm_wait(self, wait: WaitRow, timeout_s: float | None) -> WaitRow:
        with self._lock:
            self._status(wait.run_id)
            holder = next((w.step_id for w in self._waits.values() if w.run_id == wait.run_id and w.event == wait.event), None)
            if holder is not None and holder != wait.step_id:
                raise InvalidValue(
                    f"step {wait.step_id!r}: event {wait.event!r} is waited for by step {holder!r} already "
                    "(each wait needs an event of its own: put the item in it, e.g. 'approve-{item}')"
                )
            if holder is None:
                now = time.time()
                deadline = None if timeout_s is None else now + timeout_s
                self._waits[(wait.run_id, wait.step_id)] = replace(wait, armed_at=now, deadline=deadline, resolution=None, payload=None)
                self.writes += 1
            self._match(wait.run_id, wait.event)
            return self._wait(wait.run_id, wait.step_id)  # type: ignore[return-value]

    def send_signal(self, run_id: str, event: str, payload: Any, sensitivity: str) -> SignalReceipt:
        with self._lock:
            status = self._status(run_id)
            if status in FINAL_STATUSES:
                raise RunEnded(f"run {run_id} has ended ({status}): it waits for no event")
            had = self._signals.get((run_id, event))
            if had is not None:
                consumed_by = had["consumed_by"]
                raise SignalRefused(
                    f"run {run_id} was sent {event!r} already "
                    + ("(kept until a step waits for it)" if consumed_by is None else f"(step {consumed_by!r} consumed it)")
                )
            waiting = next((w for w in self._waits.values() if w.run_id == run_id and w.event == event), None)
            if waiting is not None and waiting.resolution == "timeout":
                raise SignalRefused(f"run {run_id}: step {waiting.step_id!r} stopped waiting for {event!r}: it timed out")
            self._signals[(run_id, event)] = {
                "payload": json.dumps(payload), "sensitivity": sensitivity, "consumed_by": None, "at": time.time(),
            }
            self.writes += 1
            if waiting is None:
                return SignalReceipt(run_id, event, None)
            self._match(run_id, event)
            return SignalReceipt(run_id, event, self._wait(run_id, waiting.step_id))

    def wait_of(self, run_id: str, step_id: str) -> WaitRow | None:
        with self._lock:
            return self._wait(run_id, step_id)

    def open_waits(self, run_ids: list[str]) -> list[WaitRow]:
        wanted = set(run_ids)
        with self._lock:
            return [w for w in self._waits.values() if w.run_id in wanted and w.resolution is None]

    def expire_waits(self, *, limit: int = 100) -> list[WaitRow]:
        now = time.time()
        with self._lock:
            due = [
                w for w in self._waits.values()
                if w.resolution is None and w.deadline is not None and w.deadline <= now
                and w.run_id in self._runs and self._runs[w.run_id].status not in FINAL_STATUSES
            ][:limit]
            for w in due:
                self._waits[(w.run_id, w.step_id)] = replace(w, resolution="timeout")
            if due:
                self.writes += 1
            return [self._wait(w.run_id, w.step_id) for w in due]  # type: ignore[misc]

    # ---- inside other operations --------------------------------------------------------------------

    def _status(self, run_id: str) -> str:
        run = self._runs.get(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} does not exist")
        return run.status

    def _match(self, run_id: str, event: str) -> None:
        signal = self._signals.get((run_id, event))
        if signal is None or signal["consumed_by"] is not None:
            return
        waiting = next((w for w in self._waits.values() if w.run_id == run_id and w.event == event and w.resolution is None), None)
        if waiting is not None:
            self._waits[(run_id, waiting.step_id)] = replace(waiting, resolution="signal")
            signal["consumed_by"] = waiting.step_id

    def _wait(self, run_id: str, step_id: str) -> WaitRow | None:
        wait = self._waits.get((run_id, step_id))
        if wait is None:
            return None
        signal = self._signals.get((run_id, wait.event))
        if wait.resolution == "signal" and signal is not None and signal["consumed_by"] == step_id:
            return replace(
                wait, payload=json.loads(signal["payload"]), sensitivity=signal["sensitivity"],
                early=wait.armed_at is not None and signal["at"] < wait.armed_at,
            )
        return wait

    def _reopen_waits(self, run_id: str) -> None:
        self._waits = {key: w for key, w in self._waits.items() if w.run_id != run_id or w.resolution == "signal"}

    def _delete_waits(self, run_ids: set[str]) -> None:
        self._waits = {key: w for key, w in self._waits.items() if w.run_id not in run_ids}
        self._signals = {key: s for key, s in self._signals.items() if key[0] not in run_ids}
