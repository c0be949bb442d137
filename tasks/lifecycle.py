"""A run's life after submit, whichever process moves it: what follows a committed node (dispatched,
never waited for), failing, cancelling and finalizing it, rewinding it when its state was lost,
and the write-behind of its contexts.

A run advances without the process that submitted it: the worker that finishes a node works out
what comes next (`tasks.advance`) and dispatches it through a `Dispatcher`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from state.errors import (
    InfrastructureError,
    LineageLost,
    NotFound,
    RoutineError,
    StaleEpoch,
    log_error,
)
from state.keys import context_id, run_of_context
from state.metrics import metrics
from state.limits import MAX_ITEMS
from state.models import ExportDestination, RunContext
from state.store import TieredStore
from state.tiers.data import CANCELLED, FINAL_STATUSES, ExportRecord, RunRow
from tasks.advance import Next, next_work, resume_points, start_item
from tasks.moves import PlanMoves, fan_out_key
from tasks.steps import StepExecutor
from tasks.messages import Dispatcher, FinalizeMessage, StepMessage
from tasks.plan import Plan, concrete
from tasks.plans import PlanCache

log = logging.getLogger(__name__)


class RunLifecycle:
    """Dispatches, fails, cancels, finalizes and rewinds runs; owns nothing (state is in the store).

    Promises: a run fails once (the first failure finalizes it); finalize writes the final
    contexts, exports and status in one transaction, a second finalize changes nothing, and the
    finalize of a failed or cancelled run never raises; a rewind resumes every point the rebuilt
    state has not passed, and messages of the old epoch are refused from then on.
    """

    def __init__(self, store: TieredStore, plans: PlanCache, dispatcher: Dispatcher, *, max_items: int = MAX_ITEMS) -> None:
        self.store = store
        self.plans = plans
        self.dispatcher = dispatcher
        self.max_items = max_items
        self.marks = StepExecutor(store)  # commits a gate's skip as a step's commit is made
        self.rewinds = 0

    # ---- what comes next ----------------------------------------------------------------------

    def dispatch(
        self, plan: Plan, run_id: str, routine: str, routine_version: int, index: int | None,
        versions: dict[str, int], contexts: dict[str, RunContext], epoch: int, items: tuple[int, ...] = (),
    ) -> list[str]:
        """Send the work that follows node ``index``, given the contexts just committed (by path);
        returns the events of the waits it came to (a wait step is sent once its wait ends)."""
        moves = self.moves(plan, run_id, epoch)
        self.send(plan, run_id, routine, routine_version, next_work(plan, index, versions, contexts, moves, items), epoch)
        return moves.waiting

    def moves(self, plan: Plan, run_id: str, epoch: int) -> PlanMoves:
        return PlanMoves(self.store, self.marks, plan, run_id, epoch, max_items=self.max_items)

    def send(self, plan: Plan, run_id: str, routine: str, routine_version: int, work: list[Next], epoch: int) -> None:
        for piece in work:
            if piece.node is None:
                self.dispatcher.finalize(
                    FinalizeMessage(run_id, routine, routine_version, piece.versions, status="succeeded", epoch=epoch)
                )
            else:
                node = plan.node(piece.node)
                step_id = concrete(node.step_id, piece.items)
                message = StepMessage(
                    run_id, routine, routine_version, piece.node, piece.versions, step_id=step_id, epoch=epoch, items=piece.items
                )
                if node.timeout_s is not None:
                    self.dispatcher.step(message, time_limit=node.timeout_s)
                else:
                    self.dispatcher.step(message)

    # ---- failing and finishing ----------------------------------------------------------------

    def step_failed_for_good(self, message: StepMessage, error: BaseException) -> None:
        """A step task that gave up: a bug fails its run; an infrastructure error that outlasted its
        retries does not (losing a server costs re-execution, never a run): the watchdog resumes
        the run once it can move again."""
        if isinstance(error, InfrastructureError):
            log_error(log, error, f"run {message.run_id}: step {message.step_id!r} gave up; the watchdog resumes the run")
            return
        log_error(log, error, f"run {message.run_id}: step {message.step_id!r} could not run")
        self.fail_run(message, f"step {message.step_id!r} could not run: {type(error).__name__}: {error}")

    def fail_run(self, message: StepMessage, error: str) -> None:
        """Fail the run of ``message`` (once: the first failure finalizes it)."""
        self.fail(message.run_id, message.routine, message.routine_version, dict(message.versions), error)

    def fail(self, run_id: str, routine: str, routine_version: int, versions: dict[str, int], error: str) -> None:
        if self.store.ledger.mark_failed(run_id, error):
            self.dispatcher.finalize(FinalizeMessage(run_id, routine, routine_version, versions, "failed", error))

    def cancel(self, run_id: str) -> bool:
        """Stop a running run: no further step starts (a step running now commits nothing) and the
        run ends ``cancelled``. False if it had ended already (or was failing)."""
        run = self.store.ledger.get_run(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} does not exist")
        if run.status in FINAL_STATUSES or run.routine_version is None:
            return False
        if not self.store.ledger.mark_failed(run_id, CANCELLED):
            return False
        log.info("run %s cancelled", run_id)
        self.dispatcher.finalize(FinalizeMessage(run_id, run.routine_name, run.routine_version, {}, "cancelled", CANCELLED))
        return True

    def finalize(self, message: FinalizeMessage) -> bool:
        """Final contexts, exports and the run's status in one L3 transaction; False if already final.

        A succeeded finalize reads its run's live lineage: from before a rewind it is refused
        (StaleEpoch); if the lineage is lost, the run is rewound (and finalized again later).
        """
        try:
            contexts = self._final_contexts(message)
        except StaleEpoch as exc:
            log.info("run %s: finalize refused: %s", message.run_id, exc)
            return False
        except LineageLost as exc:
            log_error(log, exc, f"run {message.run_id}: finalize cannot find the final state")
            self.rewind(message.run_id, message.epoch)
            return False
        summary = self.store.ledger.summary(message.run_id)
        meta = {"steps": summary["steps"], "l3_writes": summary["l3_writes"] + 1}
        if summary.get("hidden_error"):
            meta["hidden_error"] = summary["hidden_error"]  # sealed
        exports = export_records(contexts[0], self.store.blobs.open) if message.status == "succeeded" else []
        epoch = message.epoch if message.status == "succeeded" else None  # a failure ends any epoch
        status = message.status
        ledger = self.store.ledger
        try:
            finished = ledger.finish_run(
                message.run_id, status=status, error=message.error, meta=meta, contexts=contexts, exports=exports, epoch=epoch
            )
        except RoutineError as exc:  # L3 refuses the final data for good: the run fails, saying why
            log_error(log, exc, f"run {message.run_id}: finalize")
            status = "failed"
            finished = ledger.finish_run(message.run_id, status=status, error=f"finalize: {exc}", meta=meta, contexts=[], exports=[])
        if finished:
            ledger.count_l3_write(message.run_id)
            metrics().runs.labels(message.routine, status).inc()
        ledger.announce_done(message.run_id)
        return finished

    def _final_contexts(self, message: FinalizeMessage) -> list[RunContext]:
        """The run's contexts as they are now, the root first (children that never started are skipped).

        The finalize of a run that failed or was cancelled never fails for its contexts' sake (a
        routine this process cannot compile, a context it cannot open): it then ends the run with
        the contexts L3 holds, and their write-behind goes on.
        """
        if message.status == "succeeded":
            return self._contexts_of(self.plans.get(message.routine, message.routine_version), message)
        try:
            return self._contexts_of(self.plans.get(message.routine, message.routine_version), message)
        except RoutineError as exc:
            log_error(log, exc, f"run {message.run_id}: finalize ({message.status}) keeps the contexts L3 holds")
            return []

    def _contexts_of(self, plan: Plan, message: FinalizeMessage) -> list[RunContext]:
        contexts = []
        ends = {node.child_context: node for node in plan.nodes if node.kind == "child_end"}
        read: dict[str, RunContext] = {}
        for path in plan.contexts:
            ctx_id = context_id(message.run_id, path)
            if message.status == "succeeded":  # every sub-routine ran or was skipped by its `when`
                end = ends.get(path)
                parent = read.get(end.context) if end is not None else None
                if end is not None and (parent is None or not parent.has_applied(end.step_id)):
                    continue  # skipped (or inside one that was): it never had a context
                at_least = message.versions.get(path, 1)
                read[path] = self.store.read_for_step(ctx_id, epoch=message.epoch, at_least=at_least)
                contexts.append(read[path])
                continue
            try:
                contexts.append(self.store.get_context(ctx_id))
            except NotFound:
                if path == "":
                    raise
        return contexts

    # ---- rewinding ------------------------------------------------------------------------------

    def rewind(self, run_id: str, from_epoch: int) -> bool:
        """Rebuild a run whose state L2 lost from what the tiers still hold, in a new epoch, and go on.

        Each context continues from its newest intact state (L2's live entry, else L3's snapshot);
        the steps that state does not contain run again (the plan says which follow the applied
        ones), each applying once as always; messages of the old epoch are refused from now on.
        Returns False if there was nothing to do (run finished, or rewound by someone else).
        """
        run = self.store.ledger.get_run(run_id)
        if run is None or run.status in FINAL_STATUSES or run.routine_version is None:
            return False
        error = self.store.ledger.failure_of(run_id)
        if error is not None:  # the run failed (or was cancelled); only its finalize is missing
            status = "cancelled" if error == CANCELLED else "failed"
            self.dispatcher.finalize(FinalizeMessage(run_id, run.routine_name, run.routine_version, {}, status, error))
            return True
        contexts = self.store.rewinds.rebuild_lineage(run_id, from_epoch)
        if contexts is None:
            return False
        epoch = from_epoch + 1
        points = self.go_on(run, contexts, epoch)
        log.warning("run %s rewound to epoch %d from what the tiers hold: %d context(s), resuming at %d point(s)",
                    run_id, epoch, len(contexts), points)
        self.rewinds += 1
        metrics().rewinds.inc()
        return True

    def go_on(self, run: RunRow, contexts: list[RunContext], epoch: int) -> int:
        """Send what follows the steps ``contexts`` hold (the run's contexts in ``epoch``, the root
        among them): the plan says which steps follow the applied ones. Returns how many points it
        went on from."""
        run_id = run.run_id
        assert run.routine_version is not None
        plan = self.plans.get(run.routine_name, run.routine_version)
        by_path = {_path_in_run(run_id, ctx.context_id): ctx for ctx in contexts}
        if "" not in by_path:
            raise LineageLost(run_id, "the run's root context is in no tier")
        resume = resume_points(plan, by_path)
        for path in resume.orphans:
            self.store.rewinds.discard_context(context_id(run_id, path))
            del by_path[path]
        versions = {path: ctx.version for path, ctx in by_path.items()}
        moves = self.moves(plan, run_id, epoch)
        for seed in resume.fan_outs:  # each fan-out counts the items its contexts show ended
            fan_out = plan.node(seed.node)
            key = fan_out_key(concrete(fan_out.step_id, seed.items), epoch)
            self.store.ledger.start_fan_out(run_id, key, seed.total, seed.ended)
        work: list[Next] = []
        for index, items in resume.points:
            work += next_work(plan, index, versions, by_path, moves, items)
        for index, number, items in resume.start_items:
            work += start_item(plan, plan.node(index), number, versions, by_path, moves, items)
        self.send(plan, run_id, run.routine_name, run.routine_version, work, epoch)
        return len(resume.points) + len(resume.start_items)

    # ---- write-behind ---------------------------------------------------------------------------

    def flush(self, context_ids: list[str]) -> int:
        """Write contexts' newest L2 versions to L3 in one transaction; returns how many rows changed.
        A context L3 refuses for good fails its run (the others of the batch are written on their own)."""
        try:
            written = self.store.write_behind.flush(context_ids)
        except RoutineError as exc:  # L3 refuses one of them for good
            if len(context_ids) > 1:
                return sum(self.flush([one]) for one in context_ids)
            context_id_ = context_ids[0]
            run_id = run_of_context(context_id_)
            log_error(log, exc, f"run {run_id}: write-behind of {context_id_}")
            self.store.write_behind.give_up(context_id_)
            run = self.store.ledger.get_run(run_id)
            if run is not None and run.routine_version is not None:
                self.fail(run_id, run.routine_name, run.routine_version, {}, f"write-behind: {exc}")
            return 0
        if written:  # one L3 transaction, counted once for each run it wrote to
            for run_id in dict.fromkeys(run_of_context(context_id_) for context_id_ in context_ids):
                self.store.ledger.count_l3_write(run_id)
        return written


def _path_in_run(run_id: str, context_id_: str) -> str:
    return "" if context_id_ == run_id else context_id_[len(run_id) + 1 :]


def export_records(root: RunContext, open_value: Callable[[Any], Any] = lambda value: value) -> list[ExportRecord]:
    """What a finished run exports: each declared variable the root context holds (a value held by
    reference, as itself: an export outlives its run)."""
    records = []
    for declaration in root.exports:
        if declaration.variable not in root.variables:
            log.warning("run %s: export of %r skipped: no such variable", root.run_id, declaration.variable)
            continue
        records.append(
            ExportRecord(
                destination=ExportDestination(declaration.destination).value,
                run_id=root.run_id,
                variable=declaration.variable,
                key=declaration.export_key,
                scope=declaration.scope,
                value=open_value(root.variables[declaration.variable]),
                sensitivity=root.sensitivity_of(declaration.variable).value,
            )
        )
    return records
