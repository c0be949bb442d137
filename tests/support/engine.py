"""The engine-level tests' harness: `runctx.testing.LocalEnvironment` (the engine on the in-memory
tiers with the in-process dispatcher), with what some tests need on top of it, and the little
routine builders they share.

- `another_process(env)`: a second process on the same L2 and L3 (its own L1 and engine), taking
  its messages from the same queue or from one of its own;
- `Stepwise`: an environment driven one message at a time, with the faults of the recovery tests
  (L2 lost) and ways to look at a run in between (its L2 entry, its plan, where a rewind would resume).
"""

from __future__ import annotations

from typing import Any

from runctx.testing import Delivery, LocalEnvironment
from state.models import RunContext
from state.store import TieredStore
from state.tiers.data import RunRow
from state.tiers.local import LocalCache
from tasks.advance import Resume, resume_points
from tasks.engine import RunEngine
from tasks.plan import Plan
from tests.support.actions import ME as ACTIONS

# ---- routines -------------------------------------------------------------------------------------


def inc(step_id: str, by: int = 1, name: str = "counter") -> dict[str, Any]:
    return {"id": step_id, "action": "increment", "args": {"name": name, "by": by}}


def app(step_id: str, value: Any, name: str = "log") -> dict[str, Any]:
    return {"id": step_id, "action": "append", "args": {"name": name, "value": value}}


def log_step(step_id: str) -> dict[str, Any]:
    """A step appending the counter's value to ``log`` (tests.support.actions:log_counter)."""
    return {"id": step_id, "action": f"{ACTIONS}:log_counter"}


def sequence(n: int = 3) -> dict[str, Any]:
    return {"name": "seq", "variables": {"counter": 0}, "steps": [inc(f"s{i}") for i in range(1, n + 1)]}


def steps_of(row: RunRow) -> dict[str, dict[str, Any]]:
    """A run's step records (its finalize's meta) by step id."""
    return {step["id"]: step for step in row.meta["steps"]}


def ctx_id(run_id: str, path: str = "") -> str:
    return f"{run_id}/{path}" if path else run_id


def path_of(run_id: str, context_id: str) -> str:
    return "" if context_id == run_id else context_id[len(run_id) + 1 :]


# ---- more than one process --------------------------------------------------------------------------


def another_process(env: LocalEnvironment, *, same_queue: bool = True) -> LocalEnvironment:
    """Another process on ``env``'s L2 and L3: its own L1 and engine; with ``same_queue`` its engine
    sends to ``env``'s dispatcher (one broker for both), else to a queue of its own."""
    config = env.store.config
    other = type(env)(store=TieredStore(LocalCache(config), env.store.l2, env.store.l3, config=config))
    if same_queue:
        # LocalEnvironment takes no dispatcher: the engine is built again on the shared one.
        other.dispatcher = env.dispatcher
        other.engine = RunEngine(other.store, env.dispatcher, max_attempts=3)
    return other


# ---- one message at a time ----------------------------------------------------------------------------


class Stepwise(LocalEnvironment):
    """A LocalEnvironment whose messages are delivered one at a time (FIFO), so that a fault can be
    placed exactly between two of them; L3 gets only what a test flushes (`flush`)."""

    def other_process(self, *, same_queue: bool = True) -> Stepwise:
        other = another_process(self, same_queue=same_queue)
        assert isinstance(other, Stepwise)
        return other

    # driving the run
    def deliver(self, count: int = 1) -> None:
        """Deliver the next ``count`` queued messages, one at a time (FIFO)."""
        for _ in range(count):
            self.dispatcher.deliver(self.engine, self.dispatcher.queue.popleft())

    def deliver_until_finalize(self) -> Delivery:
        """Run steps until only the finalize is queued; returns it (still queued)."""
        while self.dispatcher.queue[0].kind != "finalize":
            self.deliver()
        assert len(self.dispatcher.queue) == 1
        return self.dispatcher.queue[0]

    def drain(self) -> None:
        """Deliver everything queued (and what that sends), without writing anything behind."""
        self.dispatcher.drain(self.engine)

    def flush(self, run_id: str, path: str = "") -> None:
        """The write-behind of one context: L3 gets L2's newest version."""
        self.engine.flush(ctx_id(run_id, path))

    # faults
    def lose_l2(self) -> None:
        """L2 comes back empty (run records kept) and this process's L1 is gone with it."""
        self.store.l2._contexts.clear()
        self.store.l2._due.clear()
        self.store.l2._first.clear()
        self.store.l2._heartbeats = 0
        self.store.l1.clear()

    # looking
    def row(self, run_id: str) -> RunRow:
        """The run as the ledger holds it."""
        row = self.store.ledger.get_run(run_id)
        assert row is not None
        return row

    def live(self, run_id: str, path: str = "") -> RunContext:
        """A context's live entry in L2."""
        stored = self.store.l2.get_context(ctx_id(run_id, path))
        assert stored is not None
        return stored.context

    def sent_steps(self, *, epoch: int) -> list[str]:
        """The steps sent so far in ``epoch``, in order."""
        return [d.message.step_id for d in self.dispatcher.sent if d.kind == "step" and d.message.epoch == epoch]  # type: ignore[union-attr]

    def plan(self, run_id: str) -> Plan:
        row = self.row(run_id)
        assert row.routine_version is not None
        return self.engine.plans.get(row.routine_name, row.routine_version)

    def resume_from_l3(self, run_id: str) -> Resume:
        """Where a rewind would resume if L2 were empty: resume_points over L3's snapshots."""
        by_path = {path_of(run_id, c.context_id): c for c in self.store.l3.run_contexts(run_id)}
        return resume_points(self.plan(run_id), by_path)
