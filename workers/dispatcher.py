"""Sending the engine's next pieces of work as Celery tasks (the engine's `Dispatcher`)."""

from __future__ import annotations

from celery import Celery

from tasks.messages import FinalizeMessage, StepMessage, Successor
from workers.envelopes import StepEnvelopes

# The tasks' names (`workers.celery_tasks` defines them); the dispatcher finds them in the app's
# registry by name, so that it does not import the tasks (which import the runtime that owns it).
STEP_TASK = "runctx.step"
WRITE_BEHIND_TASK = "runctx.write_behind"
FINALIZE_TASK = "runctx.finalize"
HARD_LIMIT_GRACE_S = 5.0  # after a step's soft time limit, until its process is stopped


class CeleryDispatcher:
    """Sends steps, finalizes and write-behinds as Celery tasks; each task names itself for Flower
    (``shadow_name``: "<routine>: <step>", "<routine>: finalize (<status>)", "runctx: write-behind").

    With ``envelopes`` (a worker whose broker is L2's Redis), a step's successor is pushed by the
    step's own commit instead (`workers.envelopes`), carrying the state that commit stored."""

    def __init__(self, app: Celery, envelopes: StepEnvelopes | None = None) -> None:
        self.app = app
        self.envelopes = envelopes

    def successor(self, message: StepMessage, context: str) -> Successor | None:
        return self.envelopes.successor(message, context) if self.envelopes is not None else None

    # The arguments' text for Flower and the logs: plain repr (ids and versions only) instead of
    # Celery's saferepr, which costs a step more CPU for the same string.
    def step(self, message: StepMessage, *, countdown: float = 0.0, time_limit: float | None = None) -> None:
        kwargs = message.as_kwargs()
        options: dict = {}
        if countdown > 0:
            options["countdown"] = countdown
        if time_limit is not None:
            # The soft limit raises in the action (the step fails saying it timed out); the hard
            # one, a little later, stops an action that does not let go (its process is replaced).
            options["soft_time_limit"] = time_limit
            options["time_limit"] = time_limit + HARD_LIMIT_GRACE_S
        self.app.tasks[STEP_TASK].apply_async(kwargs=kwargs, argsrepr="()", kwargsrepr=repr(kwargs), **options)

    def finalize(self, message: FinalizeMessage) -> None:
        kwargs = message.as_kwargs()
        self.app.tasks[FINALIZE_TASK].apply_async(kwargs=kwargs, argsrepr="()", kwargsrepr=repr(kwargs))

    def flush(self, context_id: str) -> None:
        self.flush_many([context_id])

    def flush_many(self, context_ids: list[str]) -> None:
        """One write-behind task for contexts that came due together (a fan-out's items do)."""
        # Sent when due, not with a countdown: a worker holding ETA tasks raises its prefetch and
        # would reserve steps that an idle worker could run.
        self.app.tasks[WRITE_BEHIND_TASK].apply_async(args=list(context_ids))

    def close(self) -> None:
        if self.envelopes is not None:
            self.envelopes.close()
