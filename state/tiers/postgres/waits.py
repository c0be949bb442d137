"""L3's waits and signals (`L3Waits`): a step waiting for an outside event, and the signals sent to
runs. A wait and a signal for the same run meet under a lock on the run's row, so whichever comes
second finds the other: a signal sent early is kept, a wait armed late consumes it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, and_, select, text

from state.errors import InvalidValue, NotFound, RunEnded, SignalRefused
from state.schema import run_signals, run_waits, runs
from state.tiers.data import FINAL_STATUSES, SignalReceipt, WaitRow
from state.tiers.postgres.database import PostgresDatabase

_WAIT_WITH_PAYLOAD = (
    select(run_waits, run_signals.c.payload, run_signals.c.sensitivity, run_signals.c.received_at)
    .select_from(
        run_waits.outerjoin(
            run_signals,
            and_(
                run_signals.c.run_id == run_waits.c.run_id, run_signals.c.event == run_waits.c.event,
                run_signals.c.consumed_by == run_waits.c.step_id,
            ),
        )
    )
)


class PostgresWaits(PostgresDatabase):
    """The run_waits and run_signals tables. Promises: an event is delivered to a run once; a wait
    is resolved once, by a signal or by its deadline, whichever comes first."""

    def arm_wait(self, wait: WaitRow, timeout_s: float | None) -> WaitRow:
        def work(conn: Connection) -> WaitRow:
            self._lock_run(conn, wait.run_id)
            holder = conn.execute(
                select(run_waits.c.step_id).where(run_waits.c.run_id == wait.run_id, run_waits.c.event == wait.event)
            ).scalar()
            if holder is not None and holder != wait.step_id:
                raise InvalidValue(
                    f"step {wait.step_id!r}: event {wait.event!r} is waited for by step {holder!r} already "
                    "(each wait needs an event of its own: put the item in it, e.g. 'approve-{item}')"
                )
            if holder is None:
                deadline = None if timeout_s is None else text("now() + make_interval(secs => :after)").bindparams(after=timeout_s)
                conn.execute(
                    run_waits.insert().values(
                        run_id=wait.run_id, step_id=wait.step_id, event=wait.event, node=wait.node,
                        items=list(wait.items), deadline=deadline,
                    )
                )
            self._match(conn, wait.run_id, wait.event)
            return self._wait(conn, wait.run_id, wait.step_id)  # type: ignore[return-value]

        return self.run(f"arm wait {wait.run_id}/{wait.step_id}", work)

    def send_signal(self, run_id: str, event: str, payload: Any, sensitivity: str) -> SignalReceipt:
        def work(conn: Connection) -> SignalReceipt:
            status = self._lock_run(conn, run_id)
            if status in FINAL_STATUSES:
                raise RunEnded(f"run {run_id} has ended ({status}): it waits for no event")
            had = conn.execute(
                select(run_signals.c.consumed_by).where(run_signals.c.run_id == run_id, run_signals.c.event == event)
            ).first()
            if had is not None:
                raise SignalRefused(_had(run_id, event, had.consumed_by))
            waiting = conn.execute(
                select(run_waits.c.step_id, run_waits.c.resolution).where(run_waits.c.run_id == run_id, run_waits.c.event == event)
            ).first()
            if waiting is not None and waiting.resolution == "timeout":
                raise SignalRefused(f"run {run_id}: step {waiting.step_id!r} stopped waiting for {event!r}: it timed out")
            conn.execute(run_signals.insert().values(run_id=run_id, event=event, payload=payload, sensitivity=sensitivity))
            if waiting is None:
                return SignalReceipt(run_id, event, None)
            self._match(conn, run_id, event)
            return SignalReceipt(run_id, event, self._wait(conn, run_id, waiting.step_id))

        return self.run(f"signal {run_id}", work)

    def wait_of(self, run_id: str, step_id: str) -> WaitRow | None:
        return self.read(lambda conn: self._wait(conn, run_id, step_id))

    def open_waits(self, run_ids: list[str]) -> list[WaitRow]:
        if not run_ids:
            return []
        query = _WAIT_WITH_PAYLOAD.where(run_waits.c.run_id.in_(run_ids), run_waits.c.resolution.is_(None))
        return [_row(row) for row in self.read(lambda conn: conn.execute(query).mappings().all())]

    def expire_waits(self, *, limit: int = 100) -> list[WaitRow]:
        due = (
            select(run_waits.c.run_id, run_waits.c.step_id)
            .join(runs, runs.c.run_id == run_waits.c.run_id)
            .where(
                run_waits.c.resolution.is_(None), run_waits.c.deadline <= text("now()"), runs.c.status.notin_(FINAL_STATUSES),
                runs.c.deployment == self.deployment,
            )
            .limit(limit)
            .with_for_update(of=run_waits, skip_locked=True)
        )

        def work(conn: Connection) -> list[WaitRow]:
            expired = []
            for run_id, step_id in conn.execute(due).all():
                conn.execute(
                    run_waits.update()
                    .where(run_waits.c.run_id == run_id, run_waits.c.step_id == step_id)
                    .values(resolution="timeout", resolved_at=text("now()"))
                )
                expired.append(self._wait(conn, run_id, step_id))
            return expired

        return self.run("expire waits", work)

    # ---- inside other transactions -----------------------------------------------------------------

    def _lock_run(self, conn: Connection, run_id: str) -> str:
        status = conn.execute(select(runs.c.status).where(runs.c.run_id == run_id).with_for_update()).scalar()
        if status is None:
            raise NotFound(f"run {run_id!r} does not exist")
        return status

    def _match(self, conn: Connection, run_id: str, event: str) -> None:
        """Resolve an open wait for ``event`` with a signal kept for it, if both are there."""
        signal = conn.execute(
            select(run_signals.c.event).where(
                run_signals.c.run_id == run_id, run_signals.c.event == event, run_signals.c.consumed_by.is_(None)
            )
        ).first()
        if signal is None:
            return
        step_id = conn.execute(
            run_waits.update()
            .where(run_waits.c.run_id == run_id, run_waits.c.event == event, run_waits.c.resolution.is_(None))
            .values(resolution="signal", resolved_at=text("now()"))
            .returning(run_waits.c.step_id)
        ).scalar()
        if step_id is not None:
            conn.execute(
                run_signals.update()
                .where(run_signals.c.run_id == run_id, run_signals.c.event == event)
                .values(consumed_by=step_id)
            )

    def _wait(self, conn: Connection, run_id: str, step_id: str) -> WaitRow | None:
        row = conn.execute(
            _WAIT_WITH_PAYLOAD.where(run_waits.c.run_id == run_id, run_waits.c.step_id == step_id)
        ).mappings().first()
        return None if row is None else _row(row)

    def _reopen_waits(self, conn: Connection, run_id: str) -> None:
        """A resumed run waits afresh where it had not been signalled (a new deadline from when it
        arrives there again); what signals delivered stays delivered."""
        conn.execute(run_waits.delete().where(run_waits.c.run_id == run_id, run_waits.c.resolution.is_distinct_from("signal")))

    def _delete_waits(self, conn: Connection, run_ids: list[str]) -> None:
        conn.execute(run_waits.delete().where(run_waits.c.run_id.in_(run_ids)))
        conn.execute(run_signals.delete().where(run_signals.c.run_id.in_(run_ids)))


def _had(run_id: str, event: str, consumed_by: str | None) -> str:
    if consumed_by is None:
        return f"run {run_id} was sent {event!r} already (kept until a step waits for it)"
    return f"run {run_id} was sent {event!r} already (step {consumed_by!r} consumed it)"


def _row(row: Any) -> WaitRow:
    return WaitRow(
        run_id=row["run_id"], step_id=row["step_id"], event=row["event"], node=row["node"], items=tuple(row["items"] or ()),
        deadline=row["deadline"].timestamp() if row["deadline"] else None,
        armed_at=row["armed_at"].timestamp() if row["armed_at"] else None,
        resolution=row["resolution"],
        payload=row["payload"] if row["resolution"] == "signal" else None,
        sensitivity=row["sensitivity"] or "public",
        early=row["received_at"] is not None and row["received_at"] < row["armed_at"],
    )
