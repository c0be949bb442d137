"""The Celery tasks: a step, the debounced write-behind, and the transactional persist of a finished run.

Each is thin: it hands its message to this process's RunEngine, which the worker layer provides
(`provide_engine`; `workers.runtime` registers one per pool process, so this module never imports
upward). The error tree decides what Celery does: an ``InfrastructureError`` is retried with
backoff, a ``RoutineError`` has already failed the run inside the engine, and a step task that
fails for good (retries used up, or a bug) fails its run in ``on_failure``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Ignore

from state.errors import InfrastructureError, RunFailed, StepFailedItsRun
from state.settings import get_settings
from state.tiers.contracts import CommittedState, Outbox
from tasks.engine import RunEngine
from tasks.envelopes import StepEnvelopes
from tasks.messages import STATE_HEADER, FinalizeMessage, StepMessage, state_from_header

_settings = get_settings()

# Infrastructure failures are retried by Celery with exponential backoff and jitter.
RETRY_OPTIONS: dict[str, Any] = {
    "autoretry_for": (InfrastructureError,),
    "retry_backoff": 0.5,
    "retry_backoff_max": 30,
    "retry_jitter": True,
}

# A step retries an infrastructure error this often (backoff up to 30 s: minutes in all); then it
# gives up without failing its run, and the watchdog resumes the run when it can move again.
STEP_RETRIES = 12

_engine_provider: Callable[[], RunEngine] | None = None


def provide_engine(provider: Callable[[], RunEngine]) -> None:
    """Tell the tasks how to get this process's engine (the worker layer does, when it is imported)."""
    global _engine_provider
    _engine_provider = provider


def _engine() -> RunEngine:
    if _engine_provider is None:
        raise RuntimeError("no engine: import `workers` (the Celery app) before running runctx tasks")
    return _engine_provider()


class StepTask(Task):
    """A step task that failed for good (retries used up, or a bug) fails its run instead of leaving it running.

    A step that failed its run raises ``StepFailedItsRun`` (the run is failed already): declared in
    ``throws``, Celery records FAILURE with the reason and logs it without a traceback.
    """

    throws = (StepFailedItsRun,)

    def shadow_name(self, args: tuple, kwargs: dict, options: dict) -> str:
        """The name Flower and the logs show, for every send (a Celery retry too)."""
        return f"{kwargs.get('routine', '?')}: {kwargs.get('step_id', '?')}"

    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict, einfo: Any) -> None:
        if not isinstance(exc, StepFailedItsRun):
            _engine().step_failed_for_good(StepMessage(**kwargs), exc)


@shared_task(
    base=StepTask,
    name="runctx.step",
    bind=True,
    max_retries=STEP_RETRIES,
    **RETRY_OPTIONS,
)
def step(
    self: Any, run_id: str, routine: str, routine_version: int, node: int, versions: dict[str, int], step_id: str = "", epoch: int = 1
) -> None:
    message = StepMessage(run_id, routine, routine_version, node, versions, step_id, epoch)
    request = self.request
    # The broker flags a message it delivers again (its worker died before acknowledging it).
    redelivered = bool((request.delivery_info or {}).get("redelivered"))
    try:
        _engine().execute_step(
            message, task_id=request.id, worker=request.hostname or "?", retries=request.retries or 0,
            redelivered=redelivered, carried=state_from_header(getattr(request, STATE_HEADER, None)),
        )
    except RunFailed:
        # Its run was cancelled or failed: the step did nothing. Flower and `celery events` show it
        # revoked (what Celery calls a task that was called off), not a success.
        self.send_event("task-revoked", terminated=False, signum=None, expired=False)
        raise Ignore() from None


def _finalize_name(task: Any, args: tuple, kwargs: dict, options: dict) -> str:
    return f"{kwargs.get('routine', '?')}: finalize ({kwargs.get('status', '?')})"


def _write_behind_name(task: Any, args: tuple, kwargs: dict, options: dict) -> str:
    # One name for all: Flower labels its metrics by task name, so a name per context or run
    # would make its series grow without bound.
    return "runctx: write-behind"


@shared_task(
    name="runctx.write_behind",
    shadow_name=_write_behind_name,
    bind=True,
    max_retries=20,
    **RETRY_OPTIONS,
)
def write_behind(self: Any, context_id: str) -> str:
    """Write a context's newest L2 version to L3 in one transaction (idempotent: only a newer version is written)."""
    return "written" if _engine().flush(context_id) else "unchanged"


@shared_task(
    name="runctx.finalize",
    shadow_name=_finalize_name,
    bind=True,
    max_retries=50,
    **RETRY_OPTIONS,
)
def finalize(
    self: Any, run_id: str, routine: str, routine_version: int, versions: dict[str, int], status: str,
    error: str | None = None, epoch: int = 1,
) -> bool:
    return _engine().finalize(FinalizeMessage(run_id, routine, routine_version, versions, status, error, epoch))


class CeleryDispatcher:
    """Sends the engine's next pieces of work as Celery tasks; each task names itself for Flower
    (``shadow_name``: "<routine>: <step>", "<routine>: finalize (<status>)", "runctx: write-behind").

    With ``envelopes`` (a worker whose broker is L2's Redis), a step's successor is pushed by the
    step's own commit instead (`tasks.envelopes`), carrying the state that commit stored."""

    def __init__(self, envelopes: StepEnvelopes | None = None) -> None:
        self.envelopes = envelopes

    def outbox(self, message: StepMessage, state: CommittedState | None = None) -> Outbox | None:
        return self.envelopes.outbox(message, state) if self.envelopes is not None else None

    # The arguments' text for Flower and the logs: plain repr (ids and versions only) instead of
    # Celery's saferepr, which costs a step ~0.1 ms of CPU for the same string.
    def step(self, message: StepMessage) -> None:
        kwargs = message.as_kwargs()
        step.apply_async(kwargs=kwargs, argsrepr="()", kwargsrepr=repr(kwargs))

    def finalize(self, message: FinalizeMessage) -> None:
        kwargs = message.as_kwargs()
        finalize.apply_async(kwargs=kwargs, argsrepr="()", kwargsrepr=repr(kwargs))

    def flush(self, context_id: str) -> None:
        # Sent when due, not with a countdown: a worker holding ETA tasks raises its prefetch and
        # would reserve steps that an idle worker could run.
        write_behind.apply_async(args=[context_id])
