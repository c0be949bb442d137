"""The Celery tasks: a step, the debounced write-behind, and the transactional persist of a finished run.

Each is thin: it hands its message to this process's engine (`workers.runtime`). The error tree
decides what Celery does: an ``InfrastructureError`` is retried with backoff, a ``RoutineError``
has already failed the run inside the engine, and a step task that fails for good (retries used
up, or a bug) fails its run in ``on_failure``.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from celery.exceptions import Ignore, TimeLimitExceeded

from state.errors import InfrastructureError, RunFailed, StepFailedItsRun
from tasks.engine import RunEngine
from tasks.messages import STATE_HEADER, FinalizeMessage, StepMessage, state_from_header
from tasks.plan import template_of
from workers.dispatcher import FINALIZE_TASK, STEP_TASK, WRITE_BEHIND_TASK
from workers.runtime import runtime

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


def _engine(task: Task) -> RunEngine:
    return runtime(task.app).engine


class StepTask(Task):
    """A step task that failed for good (retries used up, or a bug) fails its run instead of leaving it running.

    A step that failed its run raises ``StepFailedItsRun`` (the run is failed already): declared in
    ``throws``, Celery records FAILURE with the reason and logs it without a traceback of its own
    (the user action's, if any, is the exception's cause, and the engine logged it).
    """

    throws = (StepFailedItsRun,)

    def shadow_name(self, args: tuple, kwargs: dict, options: dict) -> str:
        """The name Flower and the logs show, for every send (a Celery retry too): a fan-out item's
        step by its template (``each[]/work``: one name per step, so Flower's series stay bounded)."""
        name = f"{kwargs.get('routine', '?')}: {template_of(str(kwargs.get('step_id', '?')))}"
        attempt = kwargs.get("attempt", 1)
        return f"{name} (attempt {attempt})" if attempt != 1 else name

    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict, einfo: Any) -> None:
        if not isinstance(exc, StepFailedItsRun):
            message = _message(**kwargs)
            if isinstance(exc, TimeLimitExceeded):  # the hard limit: the action did not let go
                _engine(self).step_timed_out(message)
            else:
                _engine(self).step_failed_for_good(message, exc)


def _message(
    run_id: str, routine: str, routine_version: int, node: int, versions: dict[str, int], step_id: str = "", epoch: int = 1,
    items: list[int] | None = None, attempt: int = 1,
) -> StepMessage:
    return StepMessage(run_id, routine, routine_version, node, versions, step_id, epoch, tuple(items or ()), attempt)


@shared_task(base=StepTask, name=STEP_TASK, bind=True, max_retries=STEP_RETRIES, **RETRY_OPTIONS)
def step(
    self: Any, run_id: str, routine: str, routine_version: int, node: int, versions: dict[str, int], step_id: str = "",
    epoch: int = 1, items: list[int] | None = None, attempt: int = 1,
) -> str | None:
    message = _message(run_id, routine, routine_version, node, versions, step_id, epoch, items, attempt)
    request = self.request
    # The broker flags a message it delivers again (its worker died before acknowledging it).
    redelivered = bool((request.delivery_info or {}).get("redelivered"))
    try:
        outcome = _engine(self).execute_step(
            message, task_id=request.id, worker=request.hostname or "?", retries=request.retries or 0,
            redelivered=redelivered, carried=state_from_header(getattr(request, STATE_HEADER, None)),
        )
    except RunFailed:
        # Its run was cancelled or failed: the step did nothing. Flower and `celery events` show it
        # revoked (what Celery calls a task that was called off), not a success.
        self.send_event("task-revoked", terminated=False, signum=None, expired=False)
        raise Ignore() from None
    if outcome is not None and outcome.waiting:  # the result Flower shows: the run rests, holding no message
        return ("waiting for event " if len(outcome.waiting) == 1 else "waiting for events ") + ", ".join(outcome.waiting)
    return None


def _finalize_name(task: Any, args: tuple, kwargs: dict, options: dict) -> str:
    return f"{kwargs.get('routine', '?')}: finalize ({kwargs.get('status', '?')})"


def _write_behind_name(task: Any, args: tuple, kwargs: dict, options: dict) -> str:
    # One name for all: Flower labels its metrics by task name, so a name per context or run
    # would make its series grow without bound.
    return "runctx: write-behind"


@shared_task(name=WRITE_BEHIND_TASK, shadow_name=_write_behind_name, bind=True, max_retries=20, **RETRY_OPTIONS)
def write_behind(self: Any, context_id: str, *more: str) -> str:
    """Write the contexts' newest L2 versions to L3 in one transaction (idempotent: only a newer
    version is written); a retry writes again only what is still newer."""
    written = _engine(self).flush([context_id, *more])
    if not more:
        return "written" if written else "unchanged"
    return f"{written} of {1 + len(more)} written"


@shared_task(name=FINALIZE_TASK, shadow_name=_finalize_name, bind=True, max_retries=50, **RETRY_OPTIONS)
def finalize(
    self: Any, run_id: str, routine: str, routine_version: int, versions: dict[str, int], status: str,
    error: str | None = None, epoch: int = 1,
) -> bool:
    return _engine(self).finalize(FinalizeMessage(run_id, routine, routine_version, versions, status, error, epoch))
