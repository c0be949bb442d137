"""What travels through the broker: ids and versions, and (in a header of a step's message) the
state the step before it committed, for a small context without confidential or secret values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from state.tiers.data import CommittedState, Outbox


@dataclass(frozen=True)
class StepMessage:
    run_id: str
    routine: str
    routine_version: int
    node: int
    # The version each context must at least have for this step: read-after-write across workers.
    versions: dict[str, int] = field(default_factory=dict)
    step_id: str = ""
    # The run's epoch when this was sent: after a rewind, messages of an older epoch are refused.
    epoch: int = 1
    # The item indices of the fan-outs the step is inside (outermost first): they fill its
    # template's ``[]`` (`tasks.plan.concrete`).
    items: tuple[int, ...] = ()
    attempt: int = 1  # the attempt of its action, by its retry policy (not infrastructure retries)

    def at(self, context: str, version: int) -> StepMessage:
        """This message, needing ``version`` of the context at path ``context``."""
        return replace(self, versions={**self.versions, context: version})

    def again(self) -> StepMessage:
        """This message for the next attempt of its action."""
        return replace(self, attempt=self.attempt + 1)

    def as_kwargs(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies field by field, paid twice by every step.
        kwargs = {
            "run_id": self.run_id, "routine": self.routine, "routine_version": self.routine_version, "node": self.node,
            "versions": dict(self.versions), "step_id": self.step_id, "epoch": self.epoch,
        }
        if self.items:  # only when there are: a plain step's message stays as it was
            kwargs["items"] = list(self.items)
        if self.attempt != 1:
            kwargs["attempt"] = self.attempt
        return kwargs


# The message header that carries the state the step before committed (`CommittedState`). Celery
# hands a message's headers to the task as its request, and shows them nowhere: not in task
# events (so not in Flower), not in `celery inspect`, not in its log lines but DEBUG ones.
STATE_HEADER = "runctx_state"


def state_header(state: CommittedState) -> dict[str, Any]:
    return {
        "id": state.context_id, "v": state.version, "e": state.epoch, "s": list(state.steps),
        "d": state.payload.decode(), "c": state.checksum,
    }


def state_from_header(raw: Any) -> CommittedState | None:
    """The state a message carries, if it carries a well-formed one. Whoever can write to the broker
    can write anything here: the checksum (a keyed MAC) is checked before the state is used."""
    if not isinstance(raw, dict):
        return None
    context_id, version, epoch, steps, payload, checksum = (raw.get(key) for key in ("id", "v", "e", "s", "d", "c"))
    if not (
        isinstance(context_id, str) and isinstance(payload, str) and isinstance(checksum, str)
        and type(version) is int and type(epoch) is int and isinstance(steps, list) and steps
        and all(isinstance(step_id, str) for step_id in steps)
    ):
        return None
    return CommittedState(context_id, version, epoch, tuple(steps), payload.encode(), checksum)


@dataclass(frozen=True)
class FinalizeMessage:
    run_id: str
    routine: str
    routine_version: int
    versions: dict[str, int]
    status: str  # succeeded | failed
    error: str | None = None
    epoch: int = 1

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)


class Successor(Protocol):
    """A step's message prepared to ride in the commit of the step before it (its ids made once):
    `outbox` gives it as the broker stores it, once that commit's version of the context the two
    steps share is known, carrying the state the commit stores (if it may travel)."""

    def outbox(self, version: int, state: CommittedState | None) -> Outbox: ...


class Dispatcher(Protocol):
    """Sends the next pieces of work: Celery's (`workers.dispatcher`), or the in-process one of
    `runctx.testing`."""

    def step(self, message: StepMessage, *, countdown: float = 0.0, time_limit: float | None = None) -> None:
        """Send a step's message: to run after ``countdown`` seconds (a retry's backoff), its action
        stopped after ``time_limit`` seconds (a step's ``timeout_s``)."""

    def successor(self, message: StepMessage, context: str) -> Successor | None:
        """``message`` prepared to ride in its predecessor's commit, which makes the version of the
        context at path ``context`` it needs (None: it is sent with `step` after the commit, e.g.
        where the broker is not L2's Redis)."""

    def finalize(self, message: FinalizeMessage) -> None: ...

    def flush(self, context_id: str) -> None: ...
