"""Step execution: one real node of the plan run against its context and committed once.

An action step reads its context, runs the action on a read-only view and commits the changes it
returned; a sub-routine's end merges the child context into its parent; a wait step whose wait
ended puts the signal's payload in its variable. Either is one
compare-and-set (`TieredStore.try_commit`): a commit that loses to another writer applies the
step's changes again to the newer state, so a step delivered twice applies once and no update is
lost. A single plain step that follows rides in the commit (its `Successor` message).
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from state.blobs import list_length
from state.errors import RoutineError, StepFailed, TransactionFailed
from state.keys import context_id
from state.models import DataSensitivity, RunContext
from state.store import AlreadyApplied, Committed, TieredStore
from state.tiers.data import CommitRequest, StepReport
from tasks.actions import run_action
from tasks.changes import ContextView, apply_changes
from tasks.collect import collect_items
from tasks.events import WaitTimedOut, count_end
from tasks.messages import StepMessage, Successor
from tasks.plan import FAILURE, Node, concrete

log = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 200  # a step's compare-and-set may lose this many times to concurrent writers
HIDDEN = "<hidden: the step read secret values>"

# Frames in these directories are runctx's own; a user action's traceback shows the others.
_RUNCTX_DIRS = tuple(str(Path(__file__).resolve().parent.parent / package) for package in ("state", "tasks", "workers", "runctx"))


@dataclass(frozen=True)
class StepCommit:
    """The context after a step's commit, and whether this commit applied the step."""

    context: RunContext
    applied: bool  # False: the step had been applied already (a duplicate delivery)
    dispatched: bool = False  # the commit carried what follows the step (its successor's message)
    waiting: tuple[str, ...] = ()  # what follows waits for these events (nothing was sent for it)


@dataclass(frozen=True)
class StepAttempt:
    """One start of a step in a worker: what its commit records about it (`StepReport`)."""

    run_id: str
    step_id: str
    worker: str
    started: float  # time.perf_counter() when it started
    attempts: int = 1

    def report(self) -> StepReport:
        return StepReport(self.run_id, self.step_id, self.worker, time.perf_counter() - self.started, self.attempts)


def redact(text: str, ctx: RunContext) -> str:
    """Hide the values of confidential and secret variables wherever they appear in a text."""
    for name, value in {**ctx.intermediate, **ctx.variables}.items():
        if ctx.sensitivity_of(name).masked and isinstance(value, (str, int, float)) and len(str(value)) >= 3:
            text = text.replace(str(value), "***")
    return text


def user_frames(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the first frame that is not runctx's: the user's action and what it called."""
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_RUNCTX_DIRS):
        tb = tb.tb_next
    return tb


class StepTimedOut(StepFailed):
    """A step's action ran past its ``timeout_s`` and was stopped (a retry policy names it ``Timeout``)."""

    error_types = ("Timeout",)


class StepExecutor:
    """Runs the real nodes of a plan (``action``, ``child_end`` and ``collect``) against the store.

    Owns nothing but its store. Promises: a step's changes commit once, with its id, in one
    compare-and-set, re-applied to a newer state when another writer came first; a user action's
    own error becomes StepFailed with sensitive values redacted and its traceback kept; an action
    stopped by a time limit (one of ``time_limits``) becomes StepTimedOut.
    """

    def __init__(self, store: TieredStore, time_limits: tuple[type[BaseException], ...] = ()) -> None:
        self.store = store
        self.time_limits = time_limits

    def run(self, message: StepMessage, node: Node, attempt: StepAttempt | None = None, successor: Successor | None = None) -> StepCommit:
        """Run the node and commit it, with ``attempt``'s record and ``successor``'s message."""
        if node.kind == "action":
            return self._apply_action(message, node, attempt, successor)
        if node.kind == "collect":
            return self._collect(message, node, attempt, successor)
        if node.kind == "wait":
            return self._deliver(message, node, attempt, successor)
        return self._merge_child(message, node, attempt, successor)

    def is_applied(self, message: StepMessage, node: Node) -> bool:
        """Whether the node's context holds the step already (read from the step's lineage)."""
        _, ctx = self._read(message, concrete(node.context, message.items))
        return node.done_in(ctx.has_applied, message.items)

    def _read(self, message: StepMessage, path: str) -> tuple[str, RunContext]:
        ctx_id = context_id(message.run_id, path)
        return ctx_id, self.store.read_for_step(ctx_id, epoch=message.epoch, at_least=message.versions.get(path, 1))

    def _apply_action(self, message: StepMessage, node: Node, attempt: StepAttempt | None, successor: Successor | None) -> StepCommit:
        ctx_id, base = self._read(message, concrete(node.context, message.items))
        if node.done_in(base.has_applied, message.items):
            return StepCommit(base, applied=False)
        assert node.action is not None and node.concurrency is not None
        view = ContextView(base, node.reads, open_value=self.store.blobs.open)
        changes = self._changes_of(node, view, base)
        concurrency = node.concurrency
        read = view.highest_read
        declassified = sorted(node.declassify & {change.name for change in changes})
        if declassified and read.masked:  # names only: the values stay where they are
            log.warning("run %s: step %s declassifies %s", message.run_id, node.step_id, ", ".join(declassified))

        def mutate(working: RunContext) -> None:
            apply_changes(
                working, changes, base=base, default=concurrency.default, per_variable=concurrency.variables,
                now=time.time(), raise_to=read, declassify=node.declassify,
            )

        return self._commit(ctx_id, base, message.step_id or node.step_id, mutate, attempt, successor)

    def _changes_of(self, node: Node, view: ContextView, base: RunContext) -> list[Any]:
        assert node.action is not None
        try:
            return run_action(node.action, view, node.args, node.builtin_args)
        except self.time_limits:
            raise StepTimedOut(f"timed out after {node.timeout_s:g} s") from None
        except Exception as exc:
            # A step that read confidential or secret values may have put them in its error: its
            # text and traceback are never shown or stored, only its type and the step.
            if view.highest_read.masked:
                failure = StepFailed(
                    f"action {node.action!r} raised {type(exc).__name__}: {HIDDEN}", hidden=f"{type(exc).__name__}: {exc}"
                )
                failure.error_types = _type_names(exc)
                raise failure from None
            if isinstance(exc, RoutineError) and user_frames(exc.__traceback__) is None:
                raise  # runctx's own (a built-in action's, or a result that is not changes)
            raise _user_failure(node.action, exc, base) from None

    def commit_failure(self, message: StepMessage, node: Node, error: StepFailed, attempt: StepAttempt | None) -> StepCommit:
        """Commit a failed action as its catch says (``on_failure: continue``, a tolerated item): the
        catch's mark applied, the masked error stored, and nothing else of the step."""
        assert node.catch is not None
        catch = node.catch
        ctx_id, base = self._read(message, concrete(node.context, message.items))
        step_id = message.step_id or concrete(node.step_id, message.items)
        record = {"step": step_id, "type": error.error_types[0] if error.error_types else type(error).__name__, "error": str(error)}
        mark = concrete(catch.mark, message.items)

        def mutate(working: RunContext) -> None:
            if catch.into is None:
                return
            if catch.collects:  # a group's: every failure, branch by branch
                working.set_variable(catch.into, [*(working.variables.get(catch.into) or []), record])
            else:
                working.set_variable(catch.into, record)

        return self._commit(ctx_id, base, mark, mutate, attempt, None)

    def commit_mark(self, ctx: RunContext, step_id: str) -> StepCommit:
        """Commit ``step_id`` into ``ctx``'s applied steps with no change (a gate's skip), once."""
        return self._commit(ctx.context_id, ctx, step_id, lambda working: None, None, None)

    def _collect(self, message: StepMessage, node: Node, attempt: StepAttempt | None, successor: Successor | None) -> StepCommit:
        """A fan-out's end: its items brought back into its context (`tasks.collect`)."""
        ctx_id, parent = self._read(message, concrete(node.context, message.items))
        step_id = message.step_id or concrete(node.step_id, message.items)
        if parent.has_applied(step_id):
            return StepCommit(parent, applied=False)
        assert node.fan_out is not None and node.items_context is not None
        count = list_length(parent.variables.get(node.fan_out.for_each)) or 0
        item_ids = [context_id(message.run_id, concrete(node.items_context, (*message.items, n))) for n in range(count)]
        items = self.store.read_many_for_step(item_ids, epoch=message.epoch)
        merge = node.fan_out.merge

        def mutate(working: RunContext) -> None:
            collect_items(working, items, node.fan_out, merge, failure=FAILURE)  # type: ignore[arg-type]

        return self._commit(ctx_id, parent, step_id, mutate, attempt, successor)

    def _deliver(self, message: StepMessage, node: Node, attempt: StepAttempt | None, successor: Successor | None) -> StepCommit:
        """A wait that ended (L3 says how): the signal's payload put in the step's variable, with the
        sensitivity declared for it; or, timed out, the run failed or the variable null."""
        assert node.wait is not None
        spec = node.wait
        ctx_id, base = self._read(message, concrete(node.context, message.items))
        step_id = message.step_id or concrete(node.step_id, message.items)
        if base.has_applied(step_id):
            return StepCommit(base, applied=False)
        wait = self.store.waits.of_step(message.run_id, step_id)
        if wait is None or wait.resolution is None:  # sent before its wait ended: it is sent again when it does
            log.warning("run %s: step %s has not been signalled: nothing to do yet", message.run_id, step_id)
            return StepCommit(base, applied=False)
        if wait.resolution == "timeout" and spec.on_timeout == "fail":
            count_end(message.routine, wait)
            raise WaitTimedOut(f"no event {wait.event!r} came within {spec.timeout_s:g} s")
        value = self.store.waits.payload(wait) if wait.resolution == "signal" else None
        level = DataSensitivity.highest(node.sensitivity, DataSensitivity(wait.sensitivity), base.sensitivity_of(spec.into))

        def mutate(working: RunContext) -> None:
            working.set_variable(spec.into, value, sensitivity=level)

        commit = self._commit(ctx_id, base, step_id, mutate, attempt, successor)
        if commit.applied:
            count_end(message.routine, wait)
        return commit

    def _merge_child(self, message: StepMessage, node: Node, attempt: StepAttempt | None, successor: Successor | None) -> StepCommit:
        assert node.child_context is not None and node.merge is not None
        parent_id, parent = self._read(message, concrete(node.context, message.items))
        step_id = message.step_id or concrete(node.step_id, message.items)
        if node.done_in(parent.has_applied, message.items):
            return StepCommit(parent, applied=False)
        _, child = self._read(message, concrete(node.child_context, message.items))
        merge = node.merge

        def mutate(working: RunContext) -> None:
            conflicts = working.merge_child(child, default=merge.default, per_variable=merge.variables)
            for conflict in conflicts:  # names and strategies only: values may be sensitive
                log.info("run %s: %s resolved %s by %s", message.run_id, node.step_id, conflict.name, conflict.strategy.value)

        return self._commit(parent_id, parent, step_id, mutate, attempt, successor)

    def _commit(
        self, ctx_id: str, base: RunContext, step_id: str, mutate: Callable[[RunContext], None],
        attempt: StepAttempt | None, successor: Successor | None,
    ) -> StepCommit:
        """Apply ``mutate`` to the newest state with the step's id in its applied steps, and commit it:
        again on the state that beat it, until it commits or finds the step applied already.
        Raises RunFailed if the run failed meanwhile (nothing is written)."""
        if base.has_applied(step_id):
            return StepCommit(base, applied=False)
        latest = base
        for round_ in range(COMMIT_ATTEMPTS):
            working = latest.working_copy()
            mutate(working)
            working.mark_applied(step_id)
            working.version = latest.version + 1
            working.note_step_commit(step_id)
            report = attempt.report() if attempt is not None else None
            encoded = outbox = None
            if successor is not None and report is not None and self.store.carries_outbox:
                encoded = self.store.encode(working)  # once: for the commit and for the message
                outbox = successor.outbox(working.version, self.store.travelling(working, step_id, encoded))
            request = CommitRequest(
                working, latest.version, expected_epoch=working.epoch, require_live=True, step_id=step_id,
                report=report, outbox=outbox, encoded=encoded,
            )
            outcome = self.store.try_commit(request, base=latest)
            if isinstance(outcome, Committed):
                return StepCommit(outcome.context, applied=True, dispatched=outbox is not None)
            if isinstance(outcome, AlreadyApplied):
                return StepCommit(self.store.read_for_step(ctx_id, epoch=base.epoch, at_least=latest.version), applied=False)
            # Someone committed first, or the lineage changed: take what is there now (told by the
            # refusal itself, or read again, which may refuse the step as stale or ask for a
            # rewind) and apply the changes to it.
            at_least = max(outcome.actual_version or 0, latest.version + 1)
            latest = outcome.newer or self.store.read_for_step(ctx_id, epoch=base.epoch, at_least=at_least)
            if latest.has_applied(step_id):
                return StepCommit(latest, applied=False)
            time.sleep(random.uniform(0, min(0.02, 0.0005 * 2**round_)))
        raise TransactionFailed(f"commit of step {step_id}", COMMIT_ATTEMPTS, RuntimeError("too many concurrent writers"))


def _type_names(exc: BaseException) -> tuple[str, ...]:
    """The names of an exception's class and its bases (what a retry policy's ``on`` matches)."""
    return tuple(cls.__name__ for cls in type(exc).__mro__ if cls not in (BaseException, object))


def _user_failure(action: str, exc: Exception, ctx: RunContext) -> StepFailed:
    """StepFailed for an exception a user action raised, carrying its traceback from the user's first
    frame (``StepFailed.traceback``, sensitive values redacted) and, as ``cause``, an exception with
    just those frames, which the task raises its failure from (what Flower shows)."""
    if isinstance(exc, StepFailed) and not exc.hidden:
        message = redact(str(exc), ctx)
    else:
        message = redact(f"action {action!r} raised {type(exc).__name__}: {exc}", ctx)
    frames = user_frames(exc.__traceback__)
    if frames is None:
        plain = StepFailed(message)
        plain.error_types = _type_names(exc)
        return plain
    text = "".join(
        ["Traceback (most recent call last):\n", *traceback.format_tb(frames), f"{type(exc).__name__}: {exc}\n"]
    )
    failure = StepFailed(message, traceback=redact(text, ctx))
    failure.error_types = _type_names(exc)
    if redact(str(exc), ctx) == str(exc):
        cause: BaseException = exc.with_traceback(frames)
    else:  # its text holds a masked value: the same frames under the redacted text
        cause = StepFailed(message).with_traceback(frames)
    cause.__suppress_context__ = True
    failure.cause = cause
    return failure
