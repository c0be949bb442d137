"""The run engine of one process: the pieces that move runs, wired together, and the entry points
the Celery adapter (`workers/`) and the API call. Free of Celery: what it sends goes through the
`Dispatcher` it is given, every read and write through the `TieredStore` it is given.

    plans.py       compiled plans per routine version
    submission.py  register a routine, submit a run
    step_runner.py run a step message (attempts, inline chains, what follows)
    steps.py       execute one step and commit it once
    lifecycle.py   dispatch, fail, cancel, finalize, rewind, write-behind
    operations.py  resume and fork a run that has ended
    waiting.py     signals and deadlines that end wait steps' waits (events.py: their names)
    advance.py     what follows a node; where a rebuilt run resumes
"""

from __future__ import annotations

from typing import Any

from state.limits import MAX_ITEMS
from state.models import ResourceLimits
from state.store import TieredStore
from state.tiers.data import CommittedState, SignalReceipt, WaitRow
from tasks.lifecycle import RunLifecycle
from tasks.operations import RunOperations
from tasks.messages import Dispatcher, FinalizeMessage, StepMessage
from tasks.plans import PlanCache
from tasks.routine import Routine
from tasks.submission import Submission
from tasks.step_runner import StepRunner
from tasks.steps import StepCommit
from tasks.waiting import RunWaits
from tasks.submission import RunSubmitter


class RunEngine:
    """The run state machine of one process: owns its plan cache and the pieces built on it; state
    lives in the store.

    Promises: a run and its root context are created in one L3 transaction; each step applies
    once however often its message is delivered; a step is started at most ``max_attempts``
    times; a routine error fails the run (once: the first failure finalizes it); finalize writes
    the final contexts, exports and status in one transaction, and a second finalize changes nothing.
    """

    def __init__(
        self, store: TieredStore, dispatcher: Dispatcher, *, max_attempts: int, limits: ResourceLimits | None = None,
        max_items: int = MAX_ITEMS, time_limits: tuple[type[BaseException], ...] = (),
    ) -> None:
        """``time_limits``: what the task runner raises in an action that ran past its step's
        ``timeout_s`` (Celery's SoftTimeLimitExceeded)."""
        self.store = store
        self.dispatcher = dispatcher
        self.plans = PlanCache(store)
        self.lifecycle = RunLifecycle(store, self.plans, dispatcher, max_items=max_items)
        limits = limits or ResourceLimits()
        self.submitter = RunSubmitter(store, self.plans, self.lifecycle, limits)
        self.operations = RunOperations(store, self.lifecycle)
        self.waits = RunWaits(store, self.plans, self.lifecycle, max_value_bytes=limits.max_value_bytes)
        self.steps = StepRunner(
            store, self.plans, self.lifecycle, dispatcher, max_attempts=max_attempts, time_limits=time_limits
        )

    # ---- submitting ---------------------------------------------------------------------------

    def register(self, routine: Routine) -> int:
        """Store the routine definition (a new version only if it changed); returns its version."""
        return self.submitter.register(routine)

    def submit(
        self, routine: Routine, *, variables: dict[str, Any] | None = None, run_id: str | None = None, source: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Start a run; its id (with ``idempotency_key``: maybe the id of the run that holds it)."""
        return self.submit_request(routine, variables=variables, run_id=run_id, source=source, idempotency_key=idempotency_key).run_id

    def submit_request(
        self, routine: Routine, *, variables: dict[str, Any] | None = None, run_id: str | None = None, source: str | None = None,
        idempotency_key: str | None = None,
    ) -> Submission:
        """`submit`, saying whether the run existed already (the same idempotency key)."""
        return self.submitter.submit(routine, variables=variables, run_id=run_id, source=source, idempotency_key=idempotency_key)

    def resume(self, run_id: str, variables: dict[str, Any] | None = None) -> bool:
        """Go on with a failed or cancelled run where it stopped (`RunOperations.resume`)."""
        return self.operations.resume(run_id, variables)

    def fork(self, run_id: str, from_step: str, variables: dict[str, Any] | None = None) -> str:
        """A new run from ``run_id`` as it was just before ``from_step`` (`RunOperations.fork`)."""
        return self.operations.fork(run_id, from_step, variables)

    def signal(self, run_id: str, event: str, payload: Any = None) -> SignalReceipt:
        """Send an event to a run: the step waiting for it goes on, else it is kept (`RunWaits.signal`)."""
        return self.waits.signal(run_id, event, payload)

    def fire_timeouts(self) -> list[WaitRow]:
        """End the waits whose deadline passed, each once (`RunWaits.fire_timeouts`)."""
        return self.waits.fire_timeouts()

    # ---- what the workers' tasks do -------------------------------------------------------------

    def execute_step(
        self, message: StepMessage, *, task_id: str, worker: str, retries: int = 0, redelivered: bool = False,
        carried: CommittedState | None = None,
    ) -> StepCommit | None:
        return self.steps.execute_step(
            message, task_id=task_id, worker=worker, retries=retries, redelivered=redelivered, carried=carried
        )

    def step_failed_for_good(self, message: StepMessage, error: BaseException) -> None:
        self.lifecycle.step_failed_for_good(message, error)

    def step_timed_out(self, message: StepMessage) -> None:
        """A step whose action held on past its hard time limit (its process was replaced)."""
        self.steps.timed_out_for_good(message)

    def finalize(self, message: FinalizeMessage) -> bool:
        return self.lifecycle.finalize(message)

    def flush(self, context_ids: str | list[str]) -> int:
        """The write-behind of one context or of several (in one L3 transaction): rows written."""
        return self.lifecycle.flush([context_ids] if isinstance(context_ids, str) else context_ids)

    # ---- operations ---------------------------------------------------------------------------

    def cancel(self, run_id: str) -> bool:
        return self.lifecycle.cancel(run_id)

    def rewind(self, run_id: str, from_epoch: int) -> bool:
        return self.lifecycle.rewind(run_id, from_epoch)

    @property
    def running(self) -> dict[str, str]:
        """Task id -> run id of the steps this process runs now."""
        return self.steps.running

    @property
    def rewinds(self) -> int:
        """How many runs this process rewound."""
        return self.lifecycle.rewinds
