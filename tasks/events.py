"""The events of wait steps (pure, no I/O): the name a step waits for in its context, which steps
of a plan an event can be for, and how a wait that ended is counted."""

from __future__ import annotations

import re

from state.errors import StepFailed
from state.metrics import metrics
from state.models import RunContext
from state.tiers.data import WaitRow
from tasks.plan import Node, Plan
from tasks.routine import EVENT_NAME

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.\-]*)\}")


class WaitTimedOut(StepFailed):
    """A wait step's deadline passed before its event came (``on_timeout: fail``)."""

    error_types = ("Timeout",)


def event_of(node: Node, ctx: RunContext) -> str:
    """The event a wait step waits for in ``ctx``: its template with each ``{name}`` replaced by the
    value of variable ``name`` (a public or internal one: an event's name is shown everywhere)."""
    assert node.wait is not None
    step = node.step_id

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in ctx.variables:
            raise StepFailed(f"step {step!r}: event {node.wait.event!r} names {name!r}, which is not a variable of its context")  # type: ignore[union-attr]
        if ctx.sensitivity_of(name).masked:
            raise StepFailed(f"step {step!r}: event {node.wait.event!r} names {name!r}, which is {ctx.sensitivity_of(name).value}: an event's name is not")  # type: ignore[union-attr]
        held = ctx.variables[name]
        return str(held).lower() if isinstance(held, bool) else str(held)

    event = _PLACEHOLDER.sub(value, node.wait.event)
    if not re.fullmatch(EVENT_NAME, event):
        raise StepFailed(
            f"step {step!r}: event {event[:80]!r} is not a name (letters, digits, '_', '.', ':' and '-', at most 200)"
        )
    return event


def _pattern(template: str) -> re.Pattern[str]:
    """What events a template can name: each placeholder stands for any name's characters."""
    parts = _PLACEHOLDER.split(template)
    literal = [re.escape(part) if number % 2 == 0 else r"[A-Za-z0-9_.:\-]+" for number, part in enumerate(parts)]
    return re.compile("".join(literal))


def waits_for(plan: Plan, event: str) -> list[Node]:
    """The wait steps of a plan that can wait for ``event``."""
    return [node for node in plan.nodes if node.kind == "wait" and node.wait and _pattern(node.wait.event).fullmatch(event)]


def ancestors(path: str) -> list[str]:
    """A context path and the paths of the contexts it was made from (a fan-out's item: its parent)."""
    parts = path.split("/") if path else []
    return ["/".join(parts[:end]) for end in range(len(parts) + 1)]


def count_end(routine: str, wait: WaitRow) -> None:
    """Count a wait that ended in its step (and the signal that ended it)."""
    instruments = metrics()
    instruments.waits.labels(routine, "signalled" if wait.resolution == "signal" else "timed_out").inc()
    if wait.resolution == "signal":
        instruments.signals.labels(routine, "early" if wait.early else "awaited").inc()
