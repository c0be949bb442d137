"""A Dispatcher that runs routines to the end inside one process: the engine drains its own queue.

Celery delivers each step, finalize and write-behind message to some worker process; here they
wait in a local queue and `drain` hands them to the engine one by one, with what Celery's task
options add around a task (retries of infrastructure errors, a step that fails for good fails its
run). On the in-memory tiers a whole run takes milliseconds and needs no server or worker, which
is what the engine tests use; on the real tiers it runs a routine without Celery.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from state.errors import InfrastructureError, RunFailed, StepFailedItsRun
from state.tiers.contracts import CommittedState, Outbox
from state.tiers.memory_l2 import MemoryL2
from tasks.messages import STATE_HEADER, FinalizeMessage, StepMessage, state_from_header, state_header

if TYPE_CHECKING:
    from tasks.engine import RunEngine

Kind = Literal["step", "finalize", "flush"]

OUTBOX_QUEUE = "in-process:steps"


@dataclass
class Delivery:
    """One message as a broker would deliver it: the same ``task_id`` on every redelivery."""

    kind: Kind
    message: StepMessage | FinalizeMessage | str
    task_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    retries: int = 0
    deliveries: int = 0  # more than one: a redelivery (as a broker flags it)
    pushed: bool = False  # sent by the commit of the step before it (the outbox)
    carried: CommittedState | None = None  # the state that commit stored, which the message carries


class InProcessDispatcher:
    """Keeps the engine's outgoing messages in a FIFO queue until `drain` runs them.

    Owns the queue and the log of everything ever sent (``sent``). Promises the delivery
    semantics the engine relies on from Celery: a message is run at least once; an
    ``InfrastructureError`` is retried up to ``max_retries`` times, then the step fails its run.
    """

    def __init__(self, *, max_retries: int = 5, worker: str = "in-process", outbox_via: MemoryL2 | None = None) -> None:
        self.queue: deque[Delivery] = deque()
        self.sent: list[Delivery] = []
        self.max_retries = max_retries
        self.worker = worker
        # With the in-memory L2 of the engine's store: a step's successor rides in its commit (as on
        # a Redis broker that is L2's Redis), and is taken from there into the queue.
        self.outbox_via = outbox_via

    # ---- the Dispatcher protocol ------------------------------------------------------------------

    def step(self, message: StepMessage) -> None:
        self._send(Delivery("step", message))

    def outbox(self, message: StepMessage, state: CommittedState | None = None) -> Outbox | None:
        if self.outbox_via is None:
            return None
        carried = state_header(state) if state is not None else None
        return Outbox(OUTBOX_QUEUE, json.dumps({"kwargs": message.as_kwargs(), STATE_HEADER: carried}).encode())

    def _take_pushed(self) -> None:
        """Move what commits pushed onto the outbox queue into the delivery queue, oldest first."""
        if self.outbox_via is None:
            return
        for raw in self.outbox_via.take_pushed(OUTBOX_QUEUE):
            pushed = json.loads(raw)
            message = StepMessage(**pushed["kwargs"])
            self._send(Delivery("step", message, pushed=True, carried=state_from_header(pushed[STATE_HEADER])))

    def finalize(self, message: FinalizeMessage) -> None:
        self._send(Delivery("finalize", message))

    def flush(self, context_id: str) -> None:
        self._send(Delivery("flush", context_id))

    def _send(self, delivery: Delivery) -> None:
        self.queue.append(delivery)
        self.sent.append(delivery)

    # ---- running what was sent ----------------------------------------------------------------------

    def deliver(self, engine: RunEngine, delivery: Delivery) -> None:
        """Run one delivery as a worker would, retrying infrastructure errors by requeueing it."""
        try:
            self._deliver(engine, delivery)
        finally:
            self._take_pushed()

    def _deliver(self, engine: RunEngine, delivery: Delivery) -> None:
        delivery.deliveries += 1
        try:
            if delivery.kind == "step":
                assert isinstance(delivery.message, StepMessage)
                engine.execute_step(
                    delivery.message, task_id=delivery.task_id, worker=self.worker, retries=delivery.retries,
                    redelivered=delivery.deliveries > delivery.retries + 1, carried=delivery.carried,
                )
            elif delivery.kind == "finalize":
                assert isinstance(delivery.message, FinalizeMessage)
                engine.finalize(delivery.message)
            else:
                assert isinstance(delivery.message, str)
                engine.flush(delivery.message)
        except (StepFailedItsRun, RunFailed):  # the step failed its run, or its run had ended: the task ends
            pass
        except InfrastructureError as exc:
            if delivery.retries < self.max_retries:
                delivery.retries += 1
                self.queue.append(delivery)
                return
            if delivery.kind != "step":
                raise
            assert isinstance(delivery.message, StepMessage)
            engine.step_failed_for_good(delivery.message, exc)
        except Exception as exc:  # a bug in a step: its run fails, as Celery's on_failure makes it
            if delivery.kind != "step":
                raise
            assert isinstance(delivery.message, StepMessage)
            engine.step_failed_for_good(delivery.message, exc)

    def drain(self, engine: RunEngine, *, limit: int = 1_000_000) -> int:
        """Run queued messages (and those they send) until none is left; returns how many ran."""
        ran = 0
        self._take_pushed()
        while self.queue:
            if ran >= limit:
                raise RuntimeError(f"still {len(self.queue)} messages queued after {limit}")
            self.deliver(engine, self.queue.popleft())
            ran += 1
        return ran

    def settle(self, engine: RunEngine) -> int:
        """Drain, then write every pending context to L3 (as the write-behind would); returns messages run."""
        ran = self.drain(engine)
        far_future = time.time() + 10 * 365 * 24 * 3600  # everything pending is due
        for context_id in engine.store.l2.claim_due(far_future, lease_s=0, limit=1_000_000):
            self.flush(context_id)
        return ran + self.drain(engine)

