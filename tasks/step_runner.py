"""Running a step message in a worker: its attempts counted, its node executed and committed, what
follows it sent (riding in its commit where the dispatcher can), and, in an inline routine, the
sequential successors that fit in its budget run in the same task."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import replace
from typing import Any

from state.errors import (
    HandedBack,
    KeyNotHeld,
    LineageLost,
    NodeMisconfigured,
    RoutineError,
    RunFailed,
    StaleEpoch,
    StepFailed,
    StepFailedItsRun,
    log_error,
)
from state.metrics import metrics
from state.store import TieredStore
from state.tiers.data import CommittedState
from tasks.lifecycle import RunLifecycle
from tasks.messages import Dispatcher, StepMessage, Successor
from tasks.events import WaitTimedOut
from tasks.expressions import ExpressionFailed
from tasks.failures import StepFailures
from tasks.plan import REAL_KINDS, Node, Plan, concrete
from tasks.plans import PlanCache
from tasks.steps import StepAttempt, StepCommit, StepExecutor, StepTimedOut

log = logging.getLogger(__name__)


@functools.cache
def _carried_states() -> Any:
    """The counter of states step messages carried (resolved once, not at every step)."""
    return metrics().invalidations.labels("message")


class StepRunner:
    """Runs step messages. Owns the record of the steps this process runs now (``running``: task id
    -> run id, which the watchdog's heartbeats report alive).

    Promises: each step applies once however often its message is delivered; a step is started at
    most ``max_attempts`` times (retries of infrastructure errors aside); a routine error fails the
    run, saying which step (and which node, when the node's settings are at fault).
    """

    def __init__(
        self, store: TieredStore, plans: PlanCache, lifecycle: RunLifecycle, dispatcher: Dispatcher, *, max_attempts: int,
        time_limits: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.store = store
        self.plans = plans
        self.lifecycle = lifecycle
        self.dispatcher = dispatcher
        self.max_attempts = max_attempts
        self.executor = StepExecutor(store, time_limits)
        self.failures = StepFailures(store, lifecycle, dispatcher, self.executor, fail=self._fail)
        self.running: dict[str, str] = {}

    def execute_step(
        self, message: StepMessage, *, task_id: str, worker: str, retries: int = 0, redelivered: bool = False,
        carried: CommittedState | None = None,
    ) -> StepCommit | None:
        """Run one step message (and, in an inline routine, the sequential successors that fit in its
        budget). Returns the last step's commit, or None when the first was skipped (a message from
        before a rewind) or its state was lost (the run is rewound). Raises RunFailed when the first
        committed nothing because its run had failed or been cancelled.

        ``carried``: the state the step before it committed, which its message carries (a small
        context without sensitive values): this process's L1 takes it, so the step reads no tier.

        A message's first start costs no bookkeeping: the step's commit is its one Redis round trip.
        A later start (``redelivered`` after a worker died, or ``retries`` of an infrastructure
        error) is counted; a step started more than ``max_attempts`` times (retries aside: the cap
        is for steps whose process keeps dying) fails its run.
        """
        if carried is not None:
            _carried_states().inc()
            self.store.invalidation.take_commit(carried.context_id, carried.version, state=carried)
        plan = self.plans.get(message.routine, message.routine_version)
        again = redelivered or retries > 0
        task_started = time.perf_counter()
        outcome: StepCommit | None = None
        step_task = task_id
        while True:
            node = plan.node(message.node)
            try:
                done = self._run_one(plan, node, message, task_id=step_task, worker=worker, retries=retries, again=again)
            except RunFailed:
                if outcome is None:
                    raise  # the task itself committed nothing: its run had ended
                return outcome
            if done is None:
                return outcome
            outcome = done
            # A duplicate stops here; a start that is not the message's first goes on, in case its
            # first run died before it dispatched what follows.
            if not (outcome.applied or again) or outcome.dispatched:
                return outcome
            versions = {**message.versions, concrete(node.context, message.items): outcome.context.version}
            successor = self._inline_successor(plan, node, task_started)
            if successor is None:
                waiting = self._go_on(plan, message, node, versions, outcome.context, worker)
                return replace(outcome, waiting=tuple(waiting)) if waiting else outcome
            message = replace(
                message, node=successor.index, versions=versions, step_id=concrete(successor.step_id, message.items), attempt=1
            )
            step_task, retries = f"{task_id}/{successor.step_id}", 0  # its own attempts, if counted
            # After a step this start applied, what follows in the chain had never started.
            again = again and not outcome.applied

    def _inline_successor(self, plan: Plan, node: Node, task_started: float) -> Node | None:
        """The step to run next in this task: an inline action right after ``node`` in its context,
        while the task is within the routine's inline budget."""
        if node.next is None or time.perf_counter() - task_started >= plan.inline_budget_s:
            return None
        successor = plan.node(node.next)
        if successor.kind != "action" or not successor.inline or successor.context != node.context or successor.retry:
            return None
        return successor

    def _run_one(
        self, plan: Plan, node: Node, message: StepMessage, *, task_id: str, worker: str, retries: int, again: bool
    ) -> StepCommit | None:
        if self.store.ledger.ended_here(message.run_id):  # heard that the run failed: start nothing more
            raise RunFailed(message.run_id)
        step_id = message.step_id or concrete(node.step_id, message.items)
        started = time.perf_counter()
        attempts = 1
        self.running[task_id] = message.run_id
        try:
            # A start that is not the message's first is counted, unless the step is applied already
            # (a chain walked again after its worker died skips those, running none of them twice).
            if again and not self.executor.is_applied(message, node):
                start = self.store.ledger.start_step(message.run_id, task_id, step_id)
                if start.run_failed:
                    raise RunFailed(message.run_id)
                attempts = start.attempt
                if start.attempt - retries > self.max_attempts:
                    starts = start.attempt - retries - 1
                    error = f"step {step_id!r} was started {starts} times without finishing"
                    self._fail(message, node, worker, error)
                    raise StepFailedItsRun(message.run_id, step_id, error)
            attempt = StepAttempt(message.run_id, step_id, worker, started, max(attempts, message.attempt))
            commit = self.executor.run(message, node, attempt, self._successor(plan, node, message))
            self._count_step(message.routine, "succeeded" if commit.applied else "duplicate", started)
            return commit
        except StaleEpoch as exc:
            log.info("run %s: %s refused: %s", message.run_id, step_id, exc)
            return None
        except LineageLost as exc:
            log_error(log, exc, f"run {message.run_id}: step {step_id!r} cannot find its state")
            self.lifecycle.rewind(message.run_id, message.epoch)
            return None
        except KeyNotHeld as exc:
            # Met during a rolling restart with a new key: the processes restarted with it can run
            # the step; this one hands its message back (a retry any node may take).
            log.warning("run %s: %s handed back by %s: %s", message.run_id, step_id, worker, exc)
            self.store.ledger.record_step(
                message.run_id, step_id,
                {"status": "waiting", "worker": worker, "duration_s": 0.0, "finished_at": time.time(),
                 "reason": f"{worker} lacks a key: {exc}"},
                epoch=message.epoch,
            )
            raise HandedBack(str(exc)) from None
        except RoutineError as exc:
            if isinstance(exc, StepFailed) and node.kind == "action":
                return self.failures.after(plan, node, message, exc, worker=worker, started=started)
            self.store.ledger.finish_step(
                message.run_id, step_id, status="timed_out" if isinstance(exc, WaitTimedOut) else "failed", worker=worker,
                duration_s=time.perf_counter() - started,
                traceback=getattr(exc, "traceback", None), epoch=message.epoch,
            )
            where = f" on {worker}" if isinstance(exc, NodeMisconfigured) else ""  # which node to set up
            error = f"step {step_id!r}{where}: {exc}"
            self._count_step(message.routine, "failed", started)
            self._fail(message, node, worker, error, exc)
            raise StepFailedItsRun(message.run_id, step_id, error) from getattr(exc, "cause", None)
        finally:
            self.running.pop(task_id, None)

    def timed_out_for_good(self, message: StepMessage) -> None:
        """A step whose action held on past its hard time limit (its process was replaced): retried
        or failing its run as a timeout."""
        plan = self.plans.get(message.routine, message.routine_version)
        node = plan.node(message.node)
        error = StepTimedOut(f"timed out after {node.timeout_s:g} s")
        try:
            self.failures.after(plan, node, message, error, worker="?", started=time.perf_counter())
        except StepFailedItsRun:
            pass

    def _successor(self, plan: Plan, node: Node, message: StepMessage) -> Successor | None:
        """When one real step follows ``node`` as a task of its own (not inline, not a fork, join,
        sub-routine start or the finalize), its message, prepared to ride in ``node``'s commit."""
        if node.next is None:
            return None
        successor = plan.node(node.next)
        if successor.kind not in REAL_KINDS or successor.kind == "wait":
            return None  # (a wait step is sent once its wait ends)
        if successor.kind == "action" and successor.inline and successor.context == node.context:
            return None  # runs in this task while the inline budget lasts
        if successor.timeout_s is not None:
            return None  # sent after the commit, with its time limit
        return self.dispatcher.successor(
            replace(
                message, node=successor.index, versions=dict(message.versions),
                step_id=concrete(successor.step_id, message.items), attempt=1,
            ),
            concrete(node.context, message.items),
        )

    @staticmethod
    def _count_step(routine: str, status: str, started: float) -> None:
        instruments = metrics()
        instruments.steps.labels(routine, status).inc()
        if status != "skipped":
            instruments.step_duration.labels(routine).observe(time.perf_counter() - started)

    def _go_on(self, plan: Plan, message: StepMessage, node: Node, versions: dict[str, int], ctx: Any, worker: str) -> list[str]:
        """Dispatch what follows a committed step; the events of the waits it came to."""
        try:
            return self.lifecycle.dispatch(
                plan, message.run_id, message.routine, message.routine_version, node.next, versions,
                {concrete(node.context, message.items): ctx}, message.epoch, message.items,
            )
        except ExpressionFailed as exc:  # a condition of what follows: it names its own step
            self._fail(message, node, worker, str(exc), exc)
        except RoutineError as exc:  # what follows cannot start (e.g. a sub-routine that cannot inherit)
            self._fail(message, node, worker, f"after step {message.step_id!r}: {exc}", exc)
        except LineageLost as exc:  # a child context this step created earlier was lost meanwhile
            log_error(log, exc, f"run {message.run_id}: what follows {message.step_id!r} cannot find its state")
            self.lifecycle.rewind(message.run_id, message.epoch)
        return []

    def _fail(self, message: StepMessage, node: Node, worker: str, error: str, cause: BaseException | None = None) -> None:
        hidden = getattr(cause, "hidden", None)
        step_id = message.step_id or node.step_id
        if hidden:  # the text the step's error really had: kept with the run, sealed, never shown
            self.store.ledger.keep_hidden_error(message.run_id, step_id, hidden)
        trace = getattr(cause, "traceback", None)
        if trace:  # a user action's own frames: where to look
            log.error("run %s failed at %s on %s: %s\n%s", message.run_id, step_id, worker, cause, trace.rstrip())
        elif cause is not None:
            log_error(log, cause, f"run {message.run_id} failed at {step_id} on {worker}")
        else:
            log.warning("run %s failed at %s on %s: %s", message.run_id, step_id, worker, error)
        self.lifecycle.fail_run(message, error)
