"""What travels through the broker: ids and versions only, never a context value."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from state.tiers.contracts import Outbox


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

    def as_kwargs(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies field by field, ~8 us, paid twice by every step.
        return {
            "run_id": self.run_id, "routine": self.routine, "routine_version": self.routine_version, "node": self.node,
            "versions": dict(self.versions), "step_id": self.step_id, "epoch": self.epoch,
        }


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


class Dispatcher(Protocol):
    """Sends the next pieces of work; the Celery implementation lives in tasks.celery_tasks."""

    def step(self, message: StepMessage) -> None: ...

    def outbox(self, message: StepMessage) -> Outbox | None:
        """``message`` as a broker message a step's commit can push (None: send it with `step`)."""

    def finalize(self, message: FinalizeMessage) -> None: ...

    def flush(self, context_id: str) -> None: ...
