"""Running routines without Celery, for tests of routines and actions (yours and runctx's own).

`LocalEnvironment` puts an engine on the in-memory tiers (or on a store you give it) with an
in-process dispatcher: Celery delivers each step, finalize and write-behind message to some worker
process; here they wait in a local queue and `InProcessDispatcher.drain` hands them to the engine
one by one, with what Celery's task options add around a task (retries of infrastructure errors,
a step that fails for good fails its run). A whole run takes milliseconds and needs no server or
worker. Broker behaviours (a message delivered twice, redelivered with the same id) are reproduced
by editing the dispatcher's queue.

    from runctx.testing import LocalEnvironment
    env = LocalEnvironment()
    run_id, row = env.run({"name": "r", "variables": {"n": 0}, "steps": [{"id": "a", "action": "increment", "args": {"name": "n"}}]})
    assert row.status == "succeeded" and env.final(run_id).get("n") == 1
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from runctx import read_models
from state.errors import InfrastructureError, RunFailed, StepFailedItsRun
from state.models import ResourceLimits, RunContext, StateCacheConfig
from state.store import TieredStore
from state.tiers.data import CommittedState, Outbox, RunRow
from state.tiers.local import LocalCache
from state.tiers.memory import MemoryL2, MemoryL3
from tasks.engine import RunEngine
from tasks.messages import STATE_HEADER, FinalizeMessage, StepMessage, state_from_header, state_header
from tasks.routine import Routine, parse_routine

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


@dataclass(frozen=True)
class _InProcessSuccessor:
    """A step's message as the in-process queue keeps it, riding in its predecessor's commit."""

    message: StepMessage
    context: str

    def outbox(self, version: int, state: CommittedState | None) -> Outbox:
        carried = state_header(state) if state is not None else None
        kwargs = self.message.at(self.context, version).as_kwargs()
        return Outbox(OUTBOX_QUEUE, json.dumps({"kwargs": kwargs, STATE_HEADER: carried}).encode())


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

    def step(self, message: StepMessage, *, countdown: float = 0.0, time_limit: float | None = None) -> None:
        # In process, a retry's backoff is not waited for and no time limit stops an action.
        self._send(Delivery("step", message))

    def successor(self, message: StepMessage, context: str) -> _InProcessSuccessor | None:
        return None if self.outbox_via is None else _InProcessSuccessor(message, context)

    def _take_pushed(self) -> None:
        """Move what commits pushed onto the outbox queue into the delivery queue, oldest first."""
        if self.outbox_via is None:
            return
        for raw in self.outbox_via.take_pushed(OUTBOX_QUEUE):
            pushed = json.loads(raw)
            kwargs = pushed["kwargs"]
            message = StepMessage(**{**kwargs, "items": tuple(kwargs.get("items", ()))})
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
        for context_id in engine.store.claim_due(lease_s=0, limit=1_000_000, now=far_future):
            self.flush(context_id)
        return ran + self.drain(engine)


class LocalEnvironment:
    """One store (the in-memory tiers unless given one), one in-process dispatcher and the engine
    between them: routines run to the end in this process, in milliseconds.

    ``outbox``: a step's successor rides in its commit, as on workers whose broker is L2's Redis.
    Owns the store it made (and the in-memory L2 that queues what commits push).
    """

    def __init__(
        self, *, max_attempts: int = 3, max_retries: int = 5, limits: ResourceLimits | None = None, outbox: bool = False,
        store: TieredStore | None = None, worker: str = "in-process",
    ) -> None:
        self.memory_l2: MemoryL2 | None = None
        if store is None:
            config = StateCacheConfig()
            self.memory_l2 = MemoryL2(prefix="mem", config=config)
            store = TieredStore(LocalCache(config), self.memory_l2, MemoryL3(), config=config)
        self.store = store
        self.dispatcher = InProcessDispatcher(
            max_retries=max_retries, worker=worker, outbox_via=self.memory_l2 if outbox else None
        )
        self.engine = RunEngine(self.store, self.dispatcher, max_attempts=max_attempts, limits=limits)

    def submit(self, routine: dict[str, Any] | Routine, variables: dict[str, Any] | None = None, *, run_id: str | None = None) -> str:
        parsed = routine if isinstance(routine, Routine) else parse_routine(routine)
        return self.engine.submit(parsed, variables=variables, run_id=run_id)

    def settle(self, run_id: str) -> RunRow:
        """Run everything queued (and the write-behind), then the run as the ledger holds it."""
        self.dispatcher.settle(self.engine)
        row = self.store.ledger.get_run(run_id)
        assert row is not None, f"no run {run_id}"
        return row

    def run(self, routine: dict[str, Any] | Routine, variables: dict[str, Any] | None = None) -> tuple[str, RunRow]:
        run_id = self.submit(routine, variables)
        return run_id, self.settle(run_id)

    def final(self, run_id: str, path: str = "") -> RunContext:
        """A context as L3 holds it (what finalize wrote): the root, or the sub-routine at ``path``."""
        ctx = self.store.read_l3(f"{run_id}/{path}" if path else run_id)
        assert ctx is not None, f"no context {path or '(root)'} in L3"
        return ctx

    def step_states(self, run_id: str) -> dict[str, Any]:
        """The run's ``runctx status --json`` object."""
        return read_models.step_states(self.store, self.engine.plans, run_id)

    def context_tree(self, run_id: str) -> dict[str, Any]:
        """The run's ``runctx context --json`` object."""
        return read_models.context_tree(self.store, self.engine.plans, run_id)

    def finalizes(self, run_id: str) -> list[Delivery]:
        return [d for d in self.dispatcher.sent if d.kind == "finalize" and d.message.run_id == run_id]  # type: ignore[union-attr]

    def first_step(self, step_id: str) -> Delivery:
        return next(d for d in self.dispatcher.sent if d.kind == "step" and d.message.step_id == step_id)  # type: ignore[union-attr]

