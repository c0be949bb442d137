"""The run state machine (Tier 2): submit a run, move it along step by step, fail it or finish it.

A run advances without the process that submitted it: the worker that finishes a node works out
what comes next (`tasks.advance`) and dispatches it through a `Dispatcher` (Celery, or the
in-process one of `tasks.in_process`); a single plain step that follows rides in the step's own
commit where the dispatcher can build its message (`Dispatcher.outbox`), so it is sent exactly
when the step commits. Steps themselves run in `tasks.steps`; every read and
write goes through the `TieredStore`, so this module speaks neither SQL nor Redis.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from cachetools import LRUCache

from state.errors import (
    ContextCorruption,
    InfrastructureError,
    InvalidRoutine,
    InvalidValue,
    LineageLost,
    NodeMisconfigured,
    NotFound,
    RoutineError,
    RunFailed,
    StaleEpoch,
    StepFailedItsRun,
    VersionConflict,
    log_error,
)
from state.keys import context_id, routine_key, run_of_context
from state.limits import MAX_CONTEXT_ID_LENGTH, canonical_json, check_name, check_run_id
from state.metrics import metrics
from state.models import (
    ExportDeclaration,
    ExportDestination,
    ResourceLimits,
    RunContext,
    RunContextInit,
)
from state.store import Follow, StepCommit, TieredStore
from state.tiers.contracts import (
    CANCELLED,
    FINAL_STATUSES,
    CommittedState,
    ConfigEntry,
    ExportRecord,
    Outbox,
    RunRow,
    StepReport,
)
from tasks.advance import next_work, resume_points
from tasks.messages import Dispatcher, FinalizeMessage, StepMessage
from tasks.plan import Node, Plan, compile_plan
from tasks.routine import Routine, check_definition, parse_routine
from tasks.steps import StepExecutor

log = logging.getLogger(__name__)


@functools.cache
def _carried_states() -> Any:
    """The counter of states step messages carried (resolved once, not at every step)."""
    return metrics().invalidations.labels("message")


class PlanCache:
    """Compiled plans per routine version, recompiled when the cached definition is replaced."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store
        self._plans: dict[tuple[str, int], tuple[Any, Plan]] = {}
        self._compiling = threading.Lock()  # a step waits for a compile in progress (`prepare`) to end

    def get(self, name: str, version: int) -> Plan:
        cached = self._plans.get((name, version))
        if cached is not None and self.store.l1.get_config(routine_key(name, version)) is cached[0]:
            return cached[1]  # compiled from the definition this process holds: every step but a few
        with self._compiling:
            entry = self.store.get_routine(name, version)
            cached = self._plans.get((name, version))
            if cached is not None and (cached[0] is entry or cached[0].data == entry.data):
                self.seed(entry, name, version, cached[1])  # read again (the L1 copy expired), unchanged
                return cached[1]
            plan = compile_plan(parse_routine(entry.data, source=f"stored routine {name}@{version}", stored=True))
            self.seed(entry, name, version, plan)
            return plan

    def compiled(self, name: str, version: int) -> Plan | None:
        """The plan of a version compiled here already, if any (no tier is read)."""
        cached = self._plans.get((name, version))
        return None if cached is None else cached[1]

    def seed(self, entry: ConfigEntry, name: str, version: int, plan: Plan) -> None:
        """Keep ``plan``, compiled from ``entry`` (as `get` would have compiled it)."""
        if len(self._plans) > 256:
            self._plans.clear()
        self._plans[(name, version)] = (entry, plan)


class RunEngine:
    """The run state machine of one process: owns its plan cache; state lives in the store.

    Promises: a run and its root context are created in one L3 transaction; each step applies
    once however often its message is delivered; a step is started at most ``max_attempts``
    times; a routine error fails the run (once: the first failure finalizes it); finalize writes
    the final contexts, exports and status in one transaction, and a second finalize changes nothing.
    """

    def __init__(
        self,
        store: TieredStore,
        dispatcher: Dispatcher,
        *,
        max_attempts: int,
        limits: ResourceLimits | None = None,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.max_attempts = max_attempts
        self.limits = limits or ResourceLimits()
        self.plans = PlanCache(store)
        # (routine name, digest of its definition) -> the version it is stored as: a definition
        # registered once is not compared with L3 again (a stored version never changes).
        self._registered: LRUCache[tuple[str, str], int] = LRUCache(maxsize=256)
        self.steps = StepExecutor(store)
        self.running: dict[str, str] = {}  # task id -> run id of the steps this process runs now
        self.rewinds = 0

    # ---- submitting ---------------------------------------------------------------------------

    def register(self, routine: Routine) -> int:
        """Store the routine definition (a new version only if it changed); returns its version."""
        return self._register(routine).version

    def _register(self, routine: Routine, known: tuple[Any, str] | None = None) -> ConfigEntry:
        """The stored version of ``routine``'s definition (stored now if no version holds it),
        cached in this process's tiers under that version's key. ``known``: its `_definition`."""
        definition, digest = known or self._definition(routine)
        version = self._registered.get((routine.name, digest)) if digest else None  # registered before: checked then
        if version is None:
            check_definition(definition, routine.name)
            try:
                latest = self.store.get_routine(routine.name)
                version = latest.version if latest.data == definition else None
            except NotFound:
                pass
            if version is None:
                version = self.store.put_routine(routine.name, definition)
            self._registered[(routine.name, digest)] = version
            self.store.l2.announce_routine(routine.name, version)  # every process may compile it now
        return self.store.cache_routine(routine.name, version, definition)

    @staticmethod
    def _definition(routine: Routine) -> tuple[Any, str]:
        """The definition stored for ``routine`` and a digest of it."""
        try:
            # Defaults left out: what the user wrote is what is stored (and measured against the
            # size limit), so a routine file within the limit is never refused for runctx's defaults.
            definition = routine.model_dump(mode="json", exclude_defaults=True)
        except (ValueError, TypeError) as exc:  # e.g. bytes that are not UTF-8, from a Routine built in Python
            raise InvalidRoutine(f"{routine.name}: the definition is not JSON ({type(exc).__name__})") from None
        try:
            digest = hashlib.blake2b(canonical_json(definition).encode(), digest_size=16).hexdigest()
        except (ValueError, TypeError, RecursionError, UnicodeEncodeError):
            digest = ""  # not JSON: check_definition says why
        return definition, digest

    def submit(
        self, routine: Routine, *, variables: dict[str, Any] | None = None, run_id: str | None = None, source: str | None = None
    ) -> str:
        """Create the run and its root context in one L3 transaction, then dispatch its first steps.

        ``source``: where the routine came from (a file), named in messages. The context is built (and every value checked against the limits) before anything is
        stored, so a refused variable leaves no trace.
        """
        run_id = check_run_id(run_id) if run_id is not None else uuid.uuid4().hex
        if variables is not None and not isinstance(variables, Mapping):
            raise InvalidValue(f"variables: expected a mapping of names to values, got a {type(variables).__name__}")
        for name in variables or {}:
            check_name(name)
        specs = routine.initial_variables()
        values = {name: spec.value for name, spec in specs.items() if not spec.required}
        for name, spec in specs.items():
            if spec.required and name not in (variables or {}):
                where = f"{source} (routine {routine.name!r})" if source else f"routine {routine.name!r}"
                raise InvalidValue(
                    f"{where}: variables.{name}: declared {spec.sensitivity.value} without a value: give it at "
                    "submit (runctx run --var-file FILE, or variables= in the API)"
                )
        unknown = set(variables or {}) - set(specs)
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
        known = self._definition(routine)
        version = self._registered.get((routine.name, known[1]))
        plan = (self.plans.compiled(routine.name, version) if version is not None else None) or compile_plan(routine)
        for path in plan.contexts:  # sub-routine contexts are named by their step path
            if len(context_id(run_id, path)) > MAX_CONTEXT_ID_LENGTH:
                raise InvalidRoutine(
                    f"{routine.name}: sub-routine {path[:80]!r}...: its context id would be longer than "
                    f"{MAX_CONTEXT_ID_LENGTH} characters (shorter step ids, or less nesting)"
                )
        entry = self._register(routine, known)
        version = entry.version
        root.routine_id = f"{routine.name}@{version}"
        self.plans.seed(entry, routine.name, version, plan)  # compiled from what is stored as that version
        run = RunRow(
            run_id=run_id, routine_name=routine.name, routine_version=version, root_context_id=run_id, status="running"
        )
        root = self.store.create_context(root, run=run)
        self.store.l2.count_l3_write(run_id)
        self.store.l2.announce_routine(routine.name, version)  # for processes that started since it was stored
        try:
            self._dispatch(plan, run_id, routine.name, version, plan.start, {"": root.version}, {"": root}, root.epoch)
        except RoutineError as exc:  # e.g. a first sub-routine that cannot inherit what it asks for
            log_error(log, exc, f"run {run_id} failed before its first step")
            self._fail_run(run_id, routine.name, version, {"": root.version}, str(exc))
        return run_id

    # ---- executing a step ---------------------------------------------------------------------

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
            self.store.take_commit(carried.context_id, carried.version, state=carried)
        plan = self.plans.get(message.routine, message.routine_version)
        again = redelivered or retries > 0
        task_started = time.perf_counter()
        outcome: StepCommit | None = None
        step_task = task_id
        while True:
            node = plan.node(message.node)
            try:
                done = self._execute_one(plan, node, message, task_id=step_task, worker=worker, retries=retries, again=again)
            except RunFailed:
                if outcome is None:
                    raise  # the task itself committed nothing: its run had ended
                return outcome
            if done is None:
                return outcome
            outcome = done
            # A duplicate stops here; a start that is not the message's first goes on, in case its
            # first run died before it dispatched what follows.
            if not (outcome.applied or again):
                return outcome
            if outcome.dispatched:  # the commit sent what follows
                return outcome
            versions = {**message.versions, node.context: outcome.context.version}
            successor = self._inline_successor(plan, node, task_started)
            if successor is None:
                self._go_on(plan, message, node, versions, outcome.context, worker)
                return outcome
            message = StepMessage(
                message.run_id, message.routine, message.routine_version, successor.index, versions,
                step_id=successor.step_id, epoch=message.epoch,
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
        if successor.kind != "action" or not successor.inline or successor.context != node.context:
            return None
        return successor

    def _execute_one(
        self, plan: Plan, node: Node, message: StepMessage, *, task_id: str, worker: str, retries: int, again: bool
    ) -> StepCommit | None:
        if self.store.l1.run_ended(message.run_id):  # heard that the run failed: start nothing more
            raise RunFailed(message.run_id)
        started = time.perf_counter()
        attempts = 1
        self.running[task_id] = message.run_id
        try:
            # A start that is not the message's first is counted, unless the step is applied already
            # (a chain walked again after its worker died skips those, running none of them twice).
            if again and not self.steps.is_applied(message, node):
                start = self.store.l2.start_step(message.run_id, task_id, node.step_id)
                if start.run_failed:
                    raise RunFailed(message.run_id)
                attempts = start.attempt
                if start.attempt - retries > self.max_attempts:
                    starts = start.attempt - retries - 1
                    error = f"step {node.step_id!r} was started {starts} times without finishing"
                    self._fail(message, node, worker, error)
                    raise StepFailedItsRun(message.run_id, node.step_id, error)

            def report() -> StepReport:  # the step's record, written by its commit
                return StepReport(message.run_id, node.step_id, worker, time.perf_counter() - started, attempts)

            commit = self.steps.run(message, node, report, self._follow(plan, node, message))
            self._count_step(message.routine, "succeeded" if commit.applied else "skipped", started)
            return commit
        except StaleEpoch as exc:
            log.info("run %s: %s refused: %s", message.run_id, node.step_id, exc)
            return None
        except LineageLost as exc:
            log_error(log, exc, f"run {message.run_id}: step {node.step_id!r} cannot find its state")
            self.rewind(message.run_id, message.epoch)
            return None
        except RoutineError as exc:
            self.store.l2.finish_step(
                message.run_id, node.step_id, status="failed", worker=worker, duration_s=time.perf_counter() - started,
                traceback=getattr(exc, "traceback", None),
            )
            where = f" on {worker}" if isinstance(exc, NodeMisconfigured) else ""  # which node to set up
            error = f"step {node.step_id!r}{where}: {exc}"
            self._count_step(message.routine, "failed", started)
            self._fail(message, node, worker, error, exc)
            raise StepFailedItsRun(message.run_id, node.step_id, error) from getattr(exc, "cause", None)
        finally:
            self.running.pop(task_id, None)

    def _follow(self, plan: Plan, node: Node, message: StepMessage) -> Follow | None:
        """When one real step follows ``node`` as a task of its own (not inline, not a fork, join,
        sub-routine start or the finalize), its message, to ride in ``node``'s commit."""
        if node.next is None:
            return None
        successor = plan.node(node.next)
        if successor.kind not in ("action", "child_end"):
            return None
        if successor.kind == "action" and successor.inline and successor.context == node.context:
            return None  # runs in this task while the inline budget lasts

        def follow(committed: RunContext, state: CommittedState | None) -> Outbox | None:
            versions = {**message.versions, node.context: committed.version}
            return self.dispatcher.outbox(
                StepMessage(
                    message.run_id, message.routine, message.routine_version, successor.index, versions,
                    step_id=successor.step_id, epoch=message.epoch,
                ),
                state,
            )

        return follow

    @staticmethod
    def _count_step(routine: str, status: str, started: float) -> None:
        instruments = metrics()
        instruments.steps.labels(routine, status).inc()
        if status != "skipped":
            instruments.step_duration.labels(routine).observe(time.perf_counter() - started)

    def _go_on(
        self, plan: Plan, message: StepMessage, node: Node, versions: dict[str, int], ctx: RunContext, worker: str
    ) -> None:
        """Dispatch what follows a committed step."""
        try:
            self._dispatch(
                plan, message.run_id, message.routine, message.routine_version, node.next, versions,
                {node.context: ctx}, message.epoch,
            )
        except RoutineError as exc:  # what follows cannot start (e.g. a sub-routine that cannot inherit)
            self._fail(message, node, worker, f"after step {node.step_id!r}: {exc}", exc)
        except LineageLost as exc:  # a child context this step created earlier was lost meanwhile
            log_error(log, exc, f"run {message.run_id}: what follows {node.step_id!r} cannot find its state")
            self.rewind(message.run_id, message.epoch)

    # ---- rewinding ------------------------------------------------------------------------------

    def rewind(self, run_id: str, from_epoch: int) -> bool:
        """Rebuild a run whose state L2 lost from what the tiers still hold, in a new epoch, and go on.

        Each context continues from its newest intact state (L2's live entry, else L3's snapshot);
        the steps that state does not contain run again (the plan says which follow the applied
        ones), each applying once as always; messages of the old epoch are refused from now on.
        Returns False if there was nothing to do (run finished, or rewound by someone else).
        """
        run = self.store.get_run(run_id)
        if run is None or run.status in FINAL_STATUSES or run.routine_version is None:
            return False
        error = self.store.l2.failure_of(run_id)
        if error is not None:  # the run failed (or was cancelled); only its finalize is missing
            status = "cancelled" if error == CANCELLED else "failed"
            self.dispatcher.finalize(FinalizeMessage(run_id, run.routine_name, run.routine_version, {}, status, error))
            return True
        contexts = self.store.rebuild_lineage(run_id, from_epoch)
        if contexts is None:
            return False
        plan = self.plans.get(run.routine_name, run.routine_version)
        by_path = {_path_in_run(run_id, ctx.context_id): ctx for ctx in contexts}
        if "" not in by_path:
            raise LineageLost(run_id, "the run's root context is in no tier")
        resume = resume_points(plan, by_path)
        for path in resume.orphans:
            self.store.discard_context(context_id(run_id, path))
            del by_path[path]
        versions = {path: ctx.version for path, ctx in by_path.items()}
        epoch = from_epoch + 1
        log.warning(
            "run %s rewound to epoch %d from what the tiers hold: %d context(s), resuming at %d point(s)",
            run_id, epoch, len(by_path), len(resume.points),
        )
        self.rewinds += 1
        metrics().rewinds.inc()
        for index in resume.points:
            self._dispatch(plan, run_id, run.routine_name, run.routine_version, index, versions, by_path, epoch)
        return True

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
        epoch: int,
    ) -> None:
        def create_child(node: Node, parent: RunContext) -> RunContext:
            return self._create_child(plan, run_id, node, parent)

        for work in next_work(plan, index, versions, contexts, create_child):
            if work.node is None:
                self.dispatcher.finalize(
                    FinalizeMessage(run_id, routine, routine_version, work.versions, status="succeeded", epoch=epoch)
                )
            else:
                step_id = plan.node(work.node).step_id
                self.dispatcher.step(
                    StepMessage(run_id, routine, routine_version, work.node, work.versions, step_id=step_id, epoch=epoch)
                )

    def _create_child(self, plan: Plan, run_id: str, node: Node, parent: RunContext) -> RunContext:
        assert node.child_context is not None
        child = parent.create_child(
            plan.contexts[node.child_context], inherit=node.inherit, context_id=context_id(run_id, node.child_context)
        )
        child.epoch = parent.epoch
        for name, spec in node.initial.items():
            if name in child.variables:
                continue
            if spec.required:  # declared without a value: only inheriting it can give it one
                raise InvalidValue(f"sub-routine {node.step_id!r}: variables.{name} has no value: inherit it")
            child.set_variable(name, spec.value, sensitivity=spec.sensitivity)
        child.exports = [ExportDeclaration(**spec.model_dump()) for spec in node.exports]  # merged up with the child
        try:
            created = self.store.create_context(child)
            self.store.l2.count_l3_write(run_id)
            return created
        except VersionConflict:  # created by an earlier delivery of this message
            return self.store.read_for_step(child.context_id, epoch=parent.epoch, at_least=1)

    # ---- failing and finishing ----------------------------------------------------------------

    def _fail(self, message: StepMessage, node: Node, worker: str, error: str, cause: BaseException | None = None) -> None:
        hidden = getattr(cause, "hidden", None)
        if hidden:  # the text the step's error really had: kept with the run, sealed, never shown
            self.store.keep_hidden_error(message.run_id, node.step_id, hidden)
        trace = getattr(cause, "traceback", None)
        if trace:  # a user action's own frames: where to look
            log.error("run %s failed at %s on %s: %s\n%s", message.run_id, node.step_id, worker, cause, trace.rstrip())
        elif cause is not None:
            log_error(log, cause, f"run {message.run_id} failed at {node.step_id} on {worker}")
        else:
            log.warning("run %s failed at %s on %s: %s", message.run_id, node.step_id, worker, error)
        self.fail_run(message, error)

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
        self._fail_run(message.run_id, message.routine, message.routine_version, dict(message.versions), error)

    def _fail_run(self, run_id: str, routine: str, routine_version: int, versions: dict[str, int], error: str) -> None:
        if self.store.mark_failed(run_id, error):
            self.dispatcher.finalize(FinalizeMessage(run_id, routine, routine_version, versions, "failed", error))

    def cancel(self, run_id: str) -> bool:
        """Stop a running run: no further step starts (a step running now commits nothing) and the
        run ends ``cancelled``. False if it had ended already (or was failing)."""
        run = self.store.get_run(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} does not exist")
        if run.status in FINAL_STATUSES or run.routine_version is None:
            return False
        if not self.store.mark_failed(run_id, CANCELLED):
            return False
        log.warning("run %s cancelled", run_id)
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
        summary = self.store.l2.run_summary(message.run_id)
        meta = {"steps": summary["steps"], "l3_writes": summary["l3_writes"] + 1}
        if summary.get("hidden_error"):
            meta["hidden_error"] = summary["hidden_error"]  # sealed
        exports = export_records(contexts[0]) if message.status == "succeeded" else []
        epoch = message.epoch if message.status == "succeeded" else None  # a failure ends any epoch
        status = message.status
        try:
            finished = self.store.finish_run(
                message.run_id, status=message.status, error=message.error, meta=meta, contexts=contexts,
                exports=exports, epoch=epoch,
            )
        except RoutineError as exc:  # L3 refuses the final data for good: the run fails, saying why
            log_error(log, exc, f"run {message.run_id}: finalize")
            status = "failed"
            finished = self.store.finish_run(
                message.run_id, status=status, error=f"finalize: {exc}", meta=meta, contexts=[], exports=[]
            )
        if finished:
            self.store.l2.count_l3_write(message.run_id)
            metrics().runs.labels(message.routine, status).inc()
        self.store.l2.announce_done(message.run_id)
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
        for path in plan.contexts:
            ctx_id = context_id(message.run_id, path)
            if message.status == "succeeded":  # every sub-routine ran: each context is there
                at_least = message.versions.get(path, 1)
                contexts.append(self.store.read_for_step(ctx_id, epoch=message.epoch, at_least=at_least))
                continue
            try:
                contexts.append(self.store.get_context(ctx_id))
            except NotFound:
                if path == "":
                    raise
        return contexts

    # ---- write-behind ---------------------------------------------------------------------------

    def flush(self, context_id_: str) -> bool:
        run_id = run_of_context(context_id_)
        try:
            written = self.store.flush(context_id_)
        except RoutineError as exc:  # L3 refuses this context for good: stop trying, fail its run
            log_error(log, exc, f"run {run_id}: write-behind of {context_id_}")
            self.store.give_up_flush(context_id_)
            run = self.store.get_run(run_id)
            if run is not None and run.routine_version is not None:
                self._fail_run(run_id, run.routine_name, run.routine_version, {}, f"write-behind: {exc}")
            return False
        if written:
            self.store.l2.count_l3_write(run_id)
        return written

    def run_status(self, run_id: str) -> RunRow | None:
        return self.store.get_run(run_id)

    def context_tree(self, run_id: str) -> dict[str, Any]:
        """The run's contexts, root first then each sub-routine's under its parent: each with its
        version in L2 and in L3, whether it waits for its write-behind, and its variables with
        confidential and secret values masked."""
        row = self.store.get_run(run_id)
        if row is None or row.routine_version is None:
            raise NotFound(f"run {run_id!r} does not exist")
        plan = self.plans.get(row.routine_name, row.routine_version)
        contexts = []
        for path in sorted(plan.contexts, key=lambda p: (p.count("/") if p else -1, p)):
            ctx_id = context_id(run_id, path)
            stored = None
            try:
                stored = self.store.l2.get_context(ctx_id)
            except ContextCorruption:
                stored = None
            in_l3 = self.store.l3.get_context(ctx_id)
            newest = stored.context if stored is not None else in_l3
            if newest is None:
                continue  # a sub-routine the run has not reached
            contexts.append({
                "id": ctx_id,
                "path": path,
                "parent": newest.parent_id,
                "routine": plan.contexts[path],
                "version_l2": stored.version if stored is not None else None,
                "version_l3": in_l3.version if in_l3 is not None else None,
                "pending_write": bool(stored is not None and stored.dirty),
                "variables": newest.masked_variables(),
                "sensitivity": {name: level.value for name, level in newest.sensitivity_map.items() if level.value != "public"},
            })
        return {"run_id": run_id, "status": row.status, "contexts": contexts}

    def step_states(self, run_id: str) -> dict[str, Any]:
        """Where a run stands: each real step's state (done, running, pending or failed) with its
        worker, attempts and duration, and the totals. "running": dispatched (the run's frontier:
        every step before it is applied) and not finished yet."""
        row = self.store.get_run(run_id)
        if row is None:
            raise NotFound(f"run {run_id!r} does not exist")
        if row.routine_version is None:
            raise NotFound(f"run {run_id!r} has no routine version")
        plan = self.plans.get(row.routine_name, row.routine_version)
        final = row.status in FINAL_STATUSES
        records = row.meta.get("steps", []) if final else self.store.l2.run_summary(run_id)["steps"]
        by_id = {record["id"]: record for record in records}
        frontier: set[str] = set()
        if not final:
            contexts = {}
            for path in plan.contexts:
                try:  # what the tiers hold now, not this process's L1 copy (a poller's goes stale)
                    contexts[path] = self.store.read_newest(context_id(run_id, path))
                except NotFound:
                    continue
            if "" in contexts:
                frontier = {plan.node(i).step_id for i in resume_points(plan, contexts).points if plan.node(i).kind in ("action", "child_end")}
        steps = []
        for node in _in_order(plan):
            record = by_id.get(node.step_id)
            if record is not None:
                state = "failed" if record.get("status") == "failed" else "done"
            elif final:
                state = "cancelled"  # the run ended before this step finished: it never will
            else:
                state = "running" if node.step_id in frontier else "pending"
            step = {
                "id": node.step_id,
                "state": state,
                "worker": record.get("worker") if record else None,
                "attempts": record.get("attempts", 1) if record else 0,
                "duration_s": record.get("duration_s") if record else None,
            }
            if record and record.get("traceback"):
                step["traceback"] = record["traceback"]
            steps.append(step)
        totals = {state: sum(1 for step in steps if step["state"] == state) for state in STEP_STATES}
        return {
            "run_id": run_id, "routine": row.routine_name, "version": row.routine_version, "status": row.status,
            "error": row.error, "steps": steps, "totals": {**totals, "total": len(steps)},
        }


STEP_STATES = ("done", "running", "pending", "failed", "cancelled")


def _in_order(plan: Plan) -> list[Node]:
    """The real steps in the order a reader expects: a sequence in order, each branch whole."""
    out: list[Node] = []

    def walk(index: int | None, stop: int | None = None) -> None:
        while index is not None and index != stop:
            node = plan.node(index)
            if node.kind in ("action", "child_end"):
                out.append(node)
            if node.kind == "fork":
                for start in node.branch_starts:
                    walk(start, stop=node.next)
                index = plan.node(node.next).next if node.next is not None else None
            else:
                index = node.next

    walk(plan.start)
    return out


def _path_in_run(run_id: str, context_id_: str) -> str:
    return "" if context_id_ == run_id else context_id_[len(run_id) + 1 :]


def export_records(root: RunContext) -> list[ExportRecord]:
    """What a finished run exports: each declared variable the root context holds."""
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
                value=root.variables[declaration.variable],
                sensitivity=root.sensitivity_of(declaration.variable).value,
            )
        )
    return records
