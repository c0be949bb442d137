"""What a failed action leads to, in order: its retry policy runs it again after a backoff (a
countdown on its message, no sleeping worker); else its catch (``on_failure: continue``, or an
item of a fan-out that tolerates failures) stores the masked error and the run goes on; else the
run fails, saying which step and why."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from state.errors import LineageLost, RoutineError, StepFailed, StepFailedItsRun, log_error
from state.metrics import metrics
from state.store import TieredStore
from tasks.lifecycle import RunLifecycle
from tasks.messages import Dispatcher, StepMessage
from tasks.plan import Node, Plan, concrete
from tasks.steps import StepAttempt, StepCommit, StepExecutor, StepTimedOut

log = logging.getLogger(__name__)

Fail = Callable[[StepMessage, Node, str, str, BaseException | None], None]


class StepFailures:
    """Handles an action step's StepFailed. Owns nothing; promises each attempt recorded (the
    retried ones as ``<step>#<attempt>``), a step retried at most its policy's ``max_attempts`` in
    all, and a caught failure committed once (its catch's mark is a step id like any other)."""

    def __init__(
        self, store: TieredStore, lifecycle: RunLifecycle, dispatcher: Dispatcher, executor: StepExecutor, *, fail: Fail
    ) -> None:
        self.store = store
        self.lifecycle = lifecycle
        self.dispatcher = dispatcher
        self.executor = executor
        self.fail = fail

    def after(
        self, plan: Plan, node: Node, message: StepMessage, error: StepFailed, *, worker: str, started: float
    ) -> StepCommit | None:
        """Retry, catch or fail (raising StepFailedItsRun): returns the caught failure's commit, or
        None when the step was sent again."""
        step_id = message.step_id or concrete(node.step_id, message.items)
        timed_out = isinstance(error, StepTimedOut)
        text = f"step {step_id!r} {error}" if timed_out else f"step {step_id!r}: {error}"
        duration = time.perf_counter() - started
        retry = node.retry
        if retry is not None and message.attempt < retry.max_attempts and retry.retries(list(error.error_types)):
            delay = retry.delay_s(message.attempt)
            self._record(message, f"{step_id}#{message.attempt}", "retried", worker, duration, error, retry_in_s=round(delay, 3))
            self._count(message.routine, "timed_out" if timed_out else "retried")
            log.info("run %s: %s attempt %d failed (%s); again in %.2f s", message.run_id, step_id, message.attempt, error, delay)
            self.dispatcher.step(message.again(), countdown=delay, time_limit=node.timeout_s)
            return None
        status = "timed_out" if timed_out else "failed"
        self._record(message, step_id, status, worker, duration, error)
        self._count(message.routine, status)
        if node.catch is not None:
            return self._caught(plan, node, message, error, worker, started)
        self.fail(message, node, worker, text, error)
        raise StepFailedItsRun(message.run_id, step_id, text) from getattr(error, "cause", None)

    def _caught(self, plan: Plan, node: Node, message: StepMessage, error: StepFailed, worker: str, started: float) -> StepCommit | None:
        assert node.catch is not None
        attempt = StepAttempt(message.run_id, concrete(node.catch.mark, message.items), worker, started, message.attempt)
        try:
            commit = self.executor.commit_failure(message, node, error, attempt)
        except LineageLost as exc:
            log_error(log, exc, f"run {message.run_id}: step {message.step_id!r} cannot find its state")
            self.lifecycle.rewind(message.run_id, message.epoch)
            return None
        log.info("run %s: %s failed and the run goes on (%s)", message.run_id, message.step_id, error)
        path = concrete(node.context, message.items)
        try:
            self.lifecycle.dispatch(
                plan, message.run_id, message.routine, message.routine_version, node.catch.then,
                {**message.versions, path: commit.context.version}, {path: commit.context}, message.epoch, message.items,
            )
        except RoutineError as exc:  # e.g. one item more failed than a fan-out tolerates
            text = f"after step {message.step_id!r}: {exc}"
            self.fail(message, node, worker, text, exc)
            raise StepFailedItsRun(message.run_id, message.step_id, text) from None
        return StepCommit(commit.context, applied=commit.applied, dispatched=True)

    def _record(
        self, message: StepMessage, record_id: str, status: str, worker: str, duration: float, error: StepFailed, **extra: object
    ) -> None:
        record = {
            "status": status, "worker": worker, "duration_s": round(duration, 6), "finished_at": time.time(),
            "attempts": message.attempt, "reason": str(error), **extra,
        }
        if error.traceback:
            record["traceback"] = error.traceback
        self.store.ledger.record_step(message.run_id, record_id, record, epoch=message.epoch)

    @staticmethod
    def _count(routine: str, status: str) -> None:
        metrics().steps.labels(routine, status).inc()
