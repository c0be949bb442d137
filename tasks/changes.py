"""What a step does to its context: a list of changes, applied at commit time.

`increment` and `append` are operations on the value current at commit, so two steps that
increment one counter concurrently both count. A `set` that meets a value someone else set
meanwhile is resolved by the variable's declared strategy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from state.conflicts import resolve_variable_conflicts
from state.errors import InvalidValue
from state.models import ConflictResolutionStrategy, DataSensitivity, RunContext


class Change(BaseModel):
    model_config = ConfigDict(frozen=True)

    op: Literal["set", "increment", "append", "delete"]
    name: str
    value: Any = None
    sensitivity: DataSensitivity | None = None

    @classmethod
    def set(cls, name: str, value: Any, sensitivity: DataSensitivity | str | None = None) -> Change:
        return cls(op="set", name=name, value=value, sensitivity=sensitivity)

    @classmethod
    def increment(cls, name: str, by: float = 1) -> Change:
        return cls(op="increment", name=name, value=by)

    @classmethod
    def append(cls, name: str, value: Any) -> Change:
        return cls(op="append", name=name, value=value)

    @classmethod
    def delete(cls, name: str) -> Change:
        return cls(op="delete", name=name)


class ContextView:
    """What a step's action may read: copies of the values, so an action cannot edit the context.

    Need-to-know: a secret variable the step did not declare in ``reads`` is absent (``get`` gives
    the default). The view remembers the most sensitive value it handed out (``highest_read``):
    what the step writes takes on that sensitivity, and its error text is hidden. A value held by
    reference (`state.blobs`) is handed out as the value itself (``open_value`` opens it).
    """

    def __init__(
        self, ctx: RunContext, reads: frozenset[str] | set[str] = frozenset(), *, open_value: Callable[[Any], Any] | None = None
    ) -> None:
        self._ctx = ctx
        self._reads = reads
        self._open = open_value
        self.highest_read = DataSensitivity.PUBLIC

    def _visible(self, name: str) -> bool:
        return self._ctx.sensitivity_of(name) is not DataSensitivity.SECRET or name in self._reads

    @property
    def run_id(self) -> str:
        return self._ctx.run_id

    @property
    def version(self) -> int:
        return self._ctx.version

    def get(self, name: str, default: Any = None) -> Any:
        if name not in self:
            return default
        self.highest_read = DataSensitivity.highest(self.highest_read, self._ctx.sensitivity_of(name))
        value = self._ctx.get(name, default)
        return copy.deepcopy(value if self._open is None else self._open(value))

    def __contains__(self, name: str) -> bool:
        return (name in self._ctx.variables or name in self._ctx.intermediate) and self._visible(name)

    def sensitivity_of(self, name: str) -> DataSensitivity:
        return self._ctx.sensitivity_of(name)

    def names(self) -> list[str]:
        return sorted(name for name in self._ctx.variables if self._visible(name))


def apply_changes(
    working: RunContext,
    changes: list[Change],
    *,
    base: RunContext,
    default: ConflictResolutionStrategy = ConflictResolutionStrategy.LAST_WRITER_WINS,
    per_variable: Mapping[str, ConflictResolutionStrategy] | None = None,
    now: float,
    raise_to: DataSensitivity = DataSensitivity.PUBLIC,
    declassify: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Apply ``changes`` (computed from ``base``) to ``working``, the newest committed version plus edits.

    Each variable written becomes at least as sensitive as ``raise_to`` (what the step read),
    unless it is in ``declassify``.
    """
    for change in changes:
        _apply_one(working, change, base=base, default=default, per_variable=per_variable, now=now)
        if change.op != "delete" and change.name not in declassify:
            working.raise_sensitivity(change.name, raise_to)


def _apply_one(
    working: RunContext,
    change: Change,
    *,
    base: RunContext,
    default: ConflictResolutionStrategy,
    per_variable: Mapping[str, ConflictResolutionStrategy] | None,
    now: float,
) -> None:
    name = change.name
    if change.op == "delete":
        working.delete_variable(name)
    elif change.op == "increment":
        current = working.get(name, 0)
        if not isinstance(current, (int, float)) or isinstance(current, bool):
            raise InvalidValue(f"increment {name!r}: current value is not a number")
        working.set_variable(name, current + change.value, written_at=now)
    elif change.op == "append":
        current = working.get(name, [])
        if not isinstance(current, list):
            raise InvalidValue(f"append {name!r}: current value is not a list")
        working.set_variable(name, [*current, change.value], written_at=now)
    else:
        value = change.value
        if name in working.variables and working.variables.get(name) != base.variables.get(name):
            # Someone committed another value since this step read it.
            value = resolve_variable_conflicts(
                current={name: working.variables[name]},
                incoming={name: value},
                base={name: base.variables.get(name)},
                default=default,
                per_variable=per_variable,
                current_written_at=working.written_at,
                incoming_written_at={name: now},
            ).values[name]
        working.set_variable(name, value, sensitivity=change.sensitivity, written_at=now)
