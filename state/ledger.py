"""The run ledger: each run's row in L3 (the truth of its status, epoch and final outcome) and its
records in L2 (reports as it goes: attempts, step outcomes, the failed flag, progress, the done
signal). Everything the engine, the watchdog and the API know of a run comes through here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from state.codec import Codec
from state.history import event_entry
from state.metrics import count_l3_write
from state.models import RunContext
from state.run_history import RunHistory
from state.sealing import binding
from state.tiers.contracts import L1Tier, L2Tier, L3Tier
from state.tiers.data import ExportRecord, RunRow, StepReport, StepStart


class RunLedger:
    """Runs and their records (`L3Ledger`, `L2RunRecords`). Owns nothing but its tiers; promises a
    run's final contexts, exports and status in one L3 transaction, and a failure flagged once."""

    def __init__(
        self, l1: L1Tier, l2: L2Tier, l3: L3Tier, *, codec: Codec, clock: Callable[[], float], history: RunHistory
    ) -> None:
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.codec = codec
        self.clock = clock
        self.history = history

    # ---- rows (L3) -------------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRow | None:
        return self.l3.get_run(run_id)

    def run_by_key(self, key: str) -> RunRow | None:
        return self.l3.run_by_key(key)

    def list_runs(self, *, status: str | None = None, routine: str | None = None, limit: int = 50) -> list[RunRow]:
        return self.l3.list_runs(status=status, routine=routine, limit=limit)

    def running_runs(self, limit: int = 1000) -> list[RunRow]:
        return self.l3.running_runs(limit)

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
    ) -> bool:
        """Final contexts, exports, status and the history entries still in L2 (with the run's end) in
        one L3 transaction; False if the run was final already (or, with ``epoch``, rewound past it).
        Its contexts then get the context TTL in L2."""
        entries, taken = self.history.to_write([ctx.context_id for ctx in contexts])
        root = contexts[0] if contexts else None
        if root is not None and self.history.keep:
            note = "" if error is None or status == "cancelled" else error
            end = event_entry(run_id, root.context_id, status, now=self.clock(), note=note, epoch=root.epoch, version=root.version)
            entries.append(end.to_json())
        finished = self.l3.finish_run(
            run_id, status=status, error=error, meta=meta, contexts=contexts, exports=exports, epoch=epoch, history=entries
        )
        if finished:
            count_l3_write("run")
            for ctx in contexts:
                self.l2.mark_flushed(
                    ctx.context_id, ctx.version, now=self.clock(), epoch=ctx.epoch, expire=True,
                    history_taken=taken.get(ctx.context_id, ""),
                )
        return finished

    # ---- records (L2) ----------------------------------------------------------------------------

    def start_step(self, run_id: str, task_id: str, step_id: str) -> StepStart:
        """Count a start of a task message that is not its first (see `L2RunRecords.start_step`)."""
        return self.l2.start_step(run_id, task_id, step_id)

    def finish_step(
        self, run_id: str, step_id: str, *, status: str = "failed", worker: str = "?", duration_s: float = 0.0,
        traceback: str | None = None, epoch: int = 1,
    ) -> None:
        self.l2.finish_step(run_id, step_id, status=status, worker=worker, duration_s=duration_s, traceback=traceback)
        self.history.event(run_id, run_id, status, step_id=step_id, worker=worker, duration_s=duration_s, epoch=epoch)

    def record_step(self, run_id: str, step_id: str, record: dict[str, Any], *, epoch: int = 1) -> None:
        """Write a step's record as given (``status``, ``finished_at`` and what else it says), and
        the event in the run's history (a step's end that made no version: skipped, retried, failed)."""
        self.l2.finish_step(run_id, step_id, record=record)
        self.history.event(
            run_id, run_id, str(record.get("status", "?")), step_id=step_id.split("#", 1)[0],
            note=str(record.get("reason", "")), worker=str(record.get("worker", "-")),
            attempt=int(record.get("attempts", 1) or 1), duration_s=float(record.get("duration_s") or 0.0) or None,
            epoch=epoch,
        )

    def report(self, report: StepReport, *, now: float) -> None:
        """Write the record a step's commit would have written (where the commit did not carry it)."""
        self.l2.finish_step(report.run_id, report.step_id, record=report.record(now))

    def start_fan_out(self, run_id: str, fan_out: str, total: int, ended: dict[int, bool] | None = None) -> int:
        """Record a fan-out's item count (see `L2RunRecords.start_fan_out`)."""
        return self.l2.start_fan_out(run_id, fan_out, total, ended)

    def end_item(self, run_id: str, fan_out: str, item: int, failed: bool) -> tuple[int, int, int]:
        """Count an item's end once: (rank, total, failed so far); rank 0 if the record is lost."""
        return self.l2.end_item(run_id, fan_out, item, failed)

    def reopen(self, run_id: str) -> RunRow | None:
        """A failed or cancelled run runs again (resumed): L3's row first (compare-and-set on its
        status: one resume wins), then its L2 records; None if it was not failed or cancelled."""
        row = self.l3.reopen_run(run_id)
        if row is not None:
            count_l3_write("run")
            self.l2.reopen_records(run_id)
            self.l1.forget_run_ended(run_id)
        return row

    def mark_failed(self, run_id: str, error: str) -> bool:
        """Flag the run failed in L2 (True for the first flag) and in this process's L1."""
        first = self.l2.mark_failed(run_id, error)
        self.l1.note_run_ended(run_id)
        return first

    def failure_of(self, run_id: str) -> str | None:
        return self.l2.failure_of(run_id)

    def ended_here(self, run_id: str) -> bool:
        """Whether this process heard that the run failed or was cancelled (a hint: L2's flag is the truth)."""
        return self.l1.run_ended(run_id)

    def keep_hidden_error(self, run_id: str, step_id: str, text: str) -> None:
        """Keep the real error text of a step that read sensitive values, sealed (only with keys: an
        in-memory store without them keeps nothing), for `runs.meta` at finalize."""
        keyring = self.codec.keyring
        if keyring is None:
            return
        sealed = keyring.seal({"step": step_id, "error": text}, binding(run_id, run_id, "error", step_id, "secret"))
        self.l2.keep_hidden_error(run_id, sealed)

    def count_l3_write(self, run_id: str, count: int = 1) -> None:
        self.l2.count_l3_write(run_id, count)

    def summary(self, run_id: str) -> dict[str, Any]:
        """The run's step records so far, its L3 write count and (sealed) hidden error."""
        return self.l2.run_summary(run_id)

    def announce_done(self, run_id: str) -> None:
        self.l2.announce_done(run_id)

    def wait_done(self, run_id: str, timeout_s: float) -> bool:
        """Block until the run announces it is done, or the timeout; a wake-up, not the truth (L3 is)."""
        return self.l2.wait_done(run_id, timeout_s)

    def touch_progress(self, run_ids: list[str], now: float) -> None:
        self.l2.touch_progress(run_ids, now)

    def count_heartbeat(self) -> int:
        """One more on the cluster's heartbeat counter in L2; the count (it goes back only if L2 did)."""
        return self.l2.count_heartbeat()

    def note_l2_loss(self, at: float, ttl_s: float) -> None:
        self.l2.note_loss(at, ttl_s)

    def l2_loss_noted(self) -> float | None:
        """When a process found that L2 lost or went back on what it held (None: not lately)."""
        return self.l2.loss_noted()

    def claim_loss_resume(self, run_id: str, ttl_s: float) -> bool:
        """Whether this process is the first to resume ``run_id`` for the noted loss (once per run
        and note, whoever holds the watchdog's lease, whatever the clocks say)."""
        return self.l2.claim_loss_resume(run_id, ttl_s)

    def progress_of(self, run_ids: list[str]) -> dict[str, float | None]:
        return self.l2.progress_of(run_ids)
