"""The run state machine (Tier 2) and step execution (Tier 3), independent of Celery.

A run advances without the process that submitted it: the worker that finishes a node works
out what comes next and dispatches it. Each step's changes are committed with the step's id in
the context's ``applied_steps`` (one compare-and-set), so a step that runs twice applies once.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import Connection, select, text
from sqlalchemy.dialects.postgresql import insert

from state.errors import (
    InvalidValue,
    LimitExceeded,
    MergeConflict,
    NotFound,
    SensitivityViolation,
    TransactionFailed,
    VersionConflict,
)
from state.models import ExportDeclaration, ExportDestination, ResourceLimits, RunContext, RunContextInit
from state.schema import blackboard_entries, exports, runs
from state.store import TieredStore
from tasks.actions import StepFailed, run_action
from tasks.changes import ContextView, apply_changes
from tasks.messages import Dispatcher, FinalizeMessage, StepMessage
from tasks.plan import Node, Plan, compile_plan, context_id
from tasks.records import RunRecords
from tasks.routine import Routine, parse_routine

log = logging.getLogger(__name__)

# Errors that come from the routine itself: the run fails, retrying would not help.
STEP_ERRORS = (StepFailed, InvalidValue, LimitExceeded, MergeConflict, SensitivityViolation)
COMMIT_ATTEMPTS = 200
FINAL_STATUSES = ("succeeded", "failed")


@dataclass(frozen=True)
class Outcome:
    context: RunContext
    applied: bool  # False: the step had been applied already (a duplicate delivery)


def redact(text: str, ctx: RunContext) -> str:
    """Hide the values of confidential and secret variables wherever they appear in a text."""
    for name, value in {**ctx.intermediate, **ctx.variables}.items():
        if ctx.sensitivity_of(name).masked and isinstance(value, (str, int, float)) and len(str(value)) >= 3:
            text = text.replace(str(value), "***")
    return text


class _AlreadyFinal(Exception):
    """Rolls back a finalize transaction that found the run finished already."""


class PlanCache:
    """Compiled plans per routine version, recompiled when the cached definition is replaced."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store
        self._plans: dict[tuple[str, int], tuple[Any, Plan]] = {}

    def get(self, name: str, version: int) -> Plan:
        entry = self.store.get_routine(name, version)
        cached = self._plans.get((name, version))
        if cached is not None and cached[0] is entry:
            return cached[1]
        plan = compile_plan(parse_routine(entry.data, source=f"stored routine {name}@{version}"))
        if len(self._plans) > 256:
            self._plans.clear()
        self._plans[(name, version)] = (entry, plan)
        return plan


class RunEngine:
    def __init__(
        self,
        store: TieredStore,
        records: RunRecords,
        dispatcher: Dispatcher,
        *,
        max_attempts: int = 5,
        limits: ResourceLimits | None = None,
    ) -> None:
        self.store = store
        self.records = records
        self.dispatcher = dispatcher
        self.max_attempts = max_attempts
        self.limits = limits or ResourceLimits()
        self.plans = PlanCache(store)

    # ---- submitting ---------------------------------------------------------------------------

    def register(self, routine: Routine) -> int:
        """Store the routine definition (a new version only if it changed); returns its version."""
        definition = routine.model_dump(mode="json")
        try:
            latest = self.store.get_routine(routine.name)
            if latest.data == definition:
                return latest.version
        except NotFound:
            pass
        return self.store.put_routine(routine.name, definition)

    def submit(self, routine: Routine, *, variables: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        """Create the run and its root context in one L3 transaction, then dispatch its first steps.

        The context is built (and every value checked against the limits) before anything is
        stored, so a refused variable leaves no trace.
        """
        run_id = run_id or uuid.uuid4().hex
        specs = routine.initial_variables()
        values = {name: spec.value for name, spec in specs.items()}
        unknown = set(variables or {}) - set(values)
        values.update(variables or {})
        root = RunContext.from_init(
            RunContextInit(
                run_id=run_id,
                routine_id=routine.name,
                variables=values,
                sensitivity_map={name: spec.sensitivity for name, spec in specs.items()},
                exports=[ExportDeclaration(**spec.model_dump()) for spec in routine.exports],
                limits=self.limits,
            )
        )
        if unknown:
            log.info("run %s: variables given that the routine does not declare: %s", run_id, sorted(unknown))
        version = self.register(routine)
        root.routine_id = f"{routine.name}@{version}"
        plan = self.plans.get(routine.name, version)

        def insert_run(conn: Connection) -> None:
            conn.execute(
                insert(runs).values(
                    run_id=run_id,
                    routine_name=routine.name,
                    routine_version=version,
                    root_context_id=run_id,
                    status="running",
                )
            )

        root = self.store.create_context(root, also=insert_run)
        self.records.count_l3_write(run_id)
        versions = {"": root.version}
        self._dispatch(plan, run_id, routine.name, version, plan.start, versions, {"": root})
        return run_id

    # ---- executing a step ---------------------------------------------------------------------

    def execute_step(self, message: StepMessage, *, task_id: str, worker: str) -> Outcome | None:
        """Run one step message. Returns None when the step was skipped (run failed, attempts used up)."""
        plan = self.plans.get(message.routine, message.routine_version)
        node = plan.node(message.node)
        start = self.records.start_step(message.run_id, task_id, node.step_id)
        if start.run_failed:
            return None
        if start.attempt > self.max_attempts:
            self._fail(message, node, worker, f"step {node.step_id!r} was started {start.attempt - 1} times without finishing")
            return None
        started = time.perf_counter()
        try:
            if node.kind == "action":
                outcome = self._apply_action(message, node)
            else:
                outcome = self._merge_child(message, node)
        except STEP_ERRORS as exc:
            self.records.finish_step(
                message.run_id, node.step_id, status="failed", worker=worker, duration_s=time.perf_counter() - started
            )
            self._fail(message, node, worker, f"step {node.step_id!r}: {exc}")
            return None
        if outcome.applied:
            self.records.finish_step(
                message.run_id, node.step_id, status="succeeded", worker=worker, duration_s=time.perf_counter() - started
            )
        # A duplicate message stops here; a redelivered one re-dispatches in case its first run died before that.
        if outcome.applied or start.attempt > 1:
            versions = {**message.versions, node.context: outcome.context.version}
            self._dispatch(
                plan, message.run_id, message.routine, message.routine_version, node.next, versions,
                {node.context: outcome.context},
            )
        return outcome

    def _apply_action(self, message: StepMessage, node: Node) -> Outcome:
        ctx_id = context_id(message.run_id, node.context)
        base = self.store.get_context(ctx_id, at_least=message.versions.get(node.context, 1))
        if node.step_id in base.applied_steps:
            return Outcome(base, applied=False)
        assert node.action is not None and node.concurrency is not None
        try:
            changes = run_action(node.action, ContextView(base), node.args)
        except STEP_ERRORS:
            raise
        except Exception as exc:  # a user action's own error fails the run; its text may quote values
            raise StepFailed(redact(f"action {node.action!r} raised {type(exc).__name__}: {exc}", base)) from exc
        concurrency = node.concurrency

        def mutate(working: RunContext) -> None:
            apply_changes(
                working, changes, base=base, default=concurrency.default, per_variable=concurrency.variables, now=time.time()
            )

        return self._commit(ctx_id, base, node.step_id, mutate)

    def _merge_child(self, message: StepMessage, node: Node) -> Outcome:
        assert node.child_context is not None and node.merge is not None
        parent_id = context_id(message.run_id, node.context)
        parent = self.store.get_context(parent_id, at_least=message.versions.get(node.context, 1))
        if node.step_id in parent.applied_steps:
            return Outcome(parent, applied=False)
        child_id = context_id(message.run_id, node.child_context)
        child = self.store.get_context(child_id, at_least=message.versions.get(node.child_context, 1))
        merge = node.merge

        def mutate(working: RunContext) -> None:
            conflicts = working.merge_child(child, default=merge.default, per_variable=merge.variables)
            for conflict in conflicts:  # names and strategies only: values may be sensitive
                log.info("run %s: %s resolved %s by %s", message.run_id, node.step_id, conflict.name, conflict.strategy.value)

        return self._commit(parent_id, parent, node.step_id, mutate)

    def _commit(self, ctx_id: str, latest: RunContext, step_id: str, mutate: Callable[[RunContext], None]) -> Outcome:
        """Compare-and-set the step's changes; on a refused write, reapply them to the newer version."""
        for attempt in range(COMMIT_ATTEMPTS):
            working = latest.working_copy()
            mutate(working)
            working.applied_steps.append(step_id)
            try:
                return Outcome(self.store.commit(working, expected_version=latest.version), applied=True)
            except VersionConflict as conflict:
                latest = self.store.get_context(ctx_id, at_least=max(conflict.actual or 0, latest.version + 1))
                if step_id in latest.applied_steps:
                    return Outcome(latest, applied=False)
                time.sleep(random.uniform(0, min(0.02, 0.0005 * 2**attempt)))
        raise TransactionFailed(f"commit of step {step_id}", COMMIT_ATTEMPTS, RuntimeError("too many concurrent writers"))

    # ---- what comes next ----------------------------------------------------------------------

    def _dispatch(
        self,
        plan: Plan,
        run_id: str,
        routine: str,
        routine_version: int,
        index: int | None,
        versions: dict[str, int],
        contexts: dict[str, RunContext],
    ) -> None:
        for target, target_versions in self._expand(plan, run_id, index, versions, contexts):
            if target is None:
                self.dispatcher.finalize(
                    FinalizeMessage(run_id, routine, routine_version, target_versions, status="succeeded")
                )
            else:
                node = plan.node(target)
                self.dispatcher.step(
                    StepMessage(run_id, routine, routine_version, target, target_versions, step_id=node.step_id)
                )

    def _expand(
        self,
        plan: Plan,
        run_id: str,
        index: int | None,
        versions: dict[str, int],
        contexts: dict[str, RunContext],
    ) -> list[tuple[int | None, dict[str, int]]]:
        """The real steps (or None: finalize) that follow, resolving forks, joins and child starts."""
        if index is None:
            return []
        node = plan.node(index)
        if node.kind in ("action", "child_end"):
            return [(index, dict(versions))]
        if node.kind == "finish":
            return [(None, dict(versions))]
        if node.kind == "fork":
            targets = []
            for start in node.branch_starts:
                targets += self._expand(plan, run_id, start, versions, contexts)
            return targets
        if node.kind == "join":
            ctx = contexts[node.context]  # the branch end that just committed did so in this context
            if not plan.is_done(index, set(ctx.applied_steps)):
                return []
            return self._expand(plan, run_id, node.next, versions, contexts)
        # child_start
        assert node.child_context is not None
        child = self._create_child(plan, run_id, node, contexts[node.context])
        contexts = {**contexts, node.child_context: child}
        versions = {**versions, node.child_context: child.version}
        return self._expand(plan, run_id, node.next, versions, contexts)

    def _create_child(self, plan: Plan, run_id: str, node: Node, parent: RunContext) -> RunContext:
        assert node.child_context is not None
        child = parent.create_child(
            plan.contexts[node.child_context], inherit=node.inherit, context_id=context_id(run_id, node.child_context)
        )
        for name, spec in node.initial.items():
            if name not in child.variables:
                child.set_variable(name, spec.value, sensitivity=spec.sensitivity)
        try:
            created = self.store.create_context(child)
            self.records.count_l3_write(run_id)
            return created
        except VersionConflict:  # created by an earlier delivery of this message
            return self.store.get_context(child.context_id)

    # ---- failing and finishing ----------------------------------------------------------------

    def _fail(self, message: StepMessage, node: Node, worker: str, error: str) -> None:
        log.warning("run %s failed at %s on %s: %s", message.run_id, node.step_id, worker, error)
        self.fail_run(message, error)

    def fail_run(self, message: StepMessage, error: str) -> None:
        """Fail the run of ``message`` (once: the first failure finalizes it)."""
        if self.records.mark_failed(message.run_id, error):
            self.dispatcher.finalize(
                FinalizeMessage(
                    message.run_id, message.routine, message.routine_version, dict(message.versions), "failed", error
                )
            )

    def finalize(self, message: FinalizeMessage) -> bool:
        """Final contexts, exports and the run's status in one L3 transaction; False if already final."""
        plan = self.plans.get(message.routine, message.routine_version)
        contexts = self._final_contexts(plan, message)
        root = contexts[0]
        summary = self.records.summary(message.run_id)
        meta = {"steps": summary["steps"], "l3_writes": summary["l3_writes"] + 1}

        def work(conn: Connection) -> None:
            finished = conn.execute(
                runs.update()
                .where(runs.c.run_id == message.run_id, runs.c.status.notin_(FINAL_STATUSES))
                .values(status=message.status, error=message.error, meta=meta, finished_at=text("now()"), updated_at=text("now()"))
                .returning(runs.c.run_id)
            ).first()
            if finished is None:
                raise _AlreadyFinal()
            for ctx in contexts:
                self.store.l3.save_context(conn, ctx)
            if message.status == "succeeded":
                self._write_exports(conn, root)

        try:
            self.store.l3.run(f"finalize run {message.run_id}", work)
        except _AlreadyFinal:
            self.records.announce_done(message.run_id)
            return False
        self.records.count_l3_write(message.run_id)
        for ctx in contexts:
            self.store.mark_flushed(ctx.context_id, ctx.version)
        self.records.announce_done(message.run_id)
        return True

    def _final_contexts(self, plan: Plan, message: FinalizeMessage) -> list[RunContext]:
        """The run's contexts as they are now, the root first (children that never started are skipped)."""
        contexts = []
        for path in plan.contexts:
            try:
                at_least = message.versions.get(path, 1) if message.status == "succeeded" else 0
                contexts.append(self.store.get_context(context_id(message.run_id, path), at_least=at_least))
            except NotFound:
                if path == "":
                    raise
        return contexts

    def _write_exports(self, conn: Connection, root: RunContext) -> None:
        for declaration in root.exports:
            if declaration.variable not in root.variables:
                log.warning("run %s: export of %r skipped: no such variable", root.run_id, declaration.variable)
                continue
            value = root.variables[declaration.variable]
            sensitivity = root.sensitivity_of(declaration.variable).value
            if declaration.destination is ExportDestination.BLACKBOARD:
                statement = insert(blackboard_entries).values(
                    scope=declaration.scope, key=declaration.export_key, value=value, sensitivity=sensitivity,
                    run_id=root.run_id, version=1,
                )
                conn.execute(
                    statement.on_conflict_do_update(
                        index_elements=[blackboard_entries.c.scope, blackboard_entries.c.key],
                        set_={
                            "value": statement.excluded.value,
                            "sensitivity": statement.excluded.sensitivity,
                            "run_id": statement.excluded.run_id,
                            "version": blackboard_entries.c.version + 1,
                            "updated_at": text("now()"),
                        },
                    )
                )
            else:
                statement = insert(exports).values(
                    run_id=root.run_id, variable=declaration.variable, key=declaration.export_key,
                    scope=declaration.scope, value=value, sensitivity=sensitivity,
                )
                conn.execute(statement.on_conflict_do_nothing())

    # ---- write-behind ---------------------------------------------------------------------------

    def flush(self, context_id_: str) -> bool:
        written = self.store.flush(context_id_)
        if written:
            self.records.count_l3_write(context_id_.split("/", 1)[0])
        return written

    def run_status(self, run_id: str) -> dict[str, Any] | None:
        row = self.store.l3.read(lambda conn: conn.execute(select(runs).where(runs.c.run_id == run_id)).mappings().first())
        return None if row is None else dict(row)
