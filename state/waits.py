"""Waiting for the outside world: a step that waits for an event (`wait_for`) and the signals sent
to runs, kept in L3 so that a wait outlives any worker and any loss of Redis, and its deadline
fires once whoever is up when it passes.

A signal's payload is sealed before it is stored when the variable it goes into is confidential or
secret (bound to its run and event), and opened only by the step that consumes it.
"""

from __future__ import annotations

from typing import Any

from state.codec import Codec
from state.tiers.contracts import L3Waits
from state.tiers.data import SignalReceipt, WaitRow


class Waits:
    """Waits and signals (`L3Waits`). Owns nothing but its tier and codec; promises that an event is
    delivered to a run once, and that a wait ends once: signalled, or timed out."""

    def __init__(self, l3: L3Waits, codec: Codec) -> None:
        self.l3 = l3
        self.codec = codec

    def arm(self, run_id: str, step_id: str, event: str, *, node: int, items: tuple[int, ...], timeout_s: float | None) -> WaitRow:
        """The step waits for ``event`` (from now, or from when it first did): the wait as it is, resolved
        already if the signal came first (or the deadline passed)."""
        return self.l3.arm_wait(WaitRow(run_id, step_id, event, node, items), timeout_s)

    def signal(self, run_id: str, event: str, payload: Any, sensitivity: str) -> SignalReceipt:
        """Send ``event`` to a run with ``payload`` (sealed first when ``sensitivity`` says so)."""
        stored = self.codec.signal_value(run_id, event, sensitivity, payload)
        return self.l3.send_signal(run_id, event, stored, sensitivity)

    def of_step(self, run_id: str, step_id: str) -> WaitRow | None:
        return self.l3.wait_of(run_id, step_id)

    def payload(self, wait: WaitRow) -> Any:
        """The payload of the signal that resolved ``wait``, opened."""
        return self.codec.open_signal(wait.run_id, wait.event, wait.sensitivity, wait.payload)

    def open(self, run_ids: list[str]) -> list[WaitRow]:
        return self.l3.open_waits(run_ids)

    def expire(self, *, limit: int = 100) -> list[WaitRow]:
        return self.l3.expire_waits(limit=limit)
