"""A RunContext's children: the context of a sub-routine, created with the variables it inherits, and
merged back into its parent under the declared strategies."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Self

from state.conflicts import ConflictResolutionStrategy, VariableConflict, resolve_variable_conflicts
from state.errors import InvalidValue, LimitExceeded
from state.limits import json_size, same_json
from state.sensitivity import DataSensitivity

if TYPE_CHECKING:
    from state.config import ResourceLimits


class ChildContexts:
    """What a RunContext does with its children (a mixin of `RunContext`, whose fields it uses)."""

    __slots__ = ()

    def create_child(
        self,
        routine_id: str,
        *,
        inherit: Iterable[str] = (),
        context_id: str | None = None,
        limits: ResourceLimits | None = None,
    ) -> Self:
        """A child context for a sub-routine. Only the named variables pass down, as copies."""
        if self.depth + 1 > self.limits.max_child_depth:
            raise LimitExceeded(routine_id, "max_child_depth", self.depth + 1, self.limits.max_child_depth)
        names = list(dict.fromkeys(inherit))
        missing = [name for name in names if name not in self.variables]
        if missing:
            raise InvalidValue(f"cannot inherit {', '.join(map(repr, missing))}: not a variable of {self.context_id}")
        child = type(self)(
            context_id=context_id or f"{self.context_id}/{uuid.uuid4().hex[:12]}",
            run_id=self.run_id,
            routine_id=routine_id,
            parent_id=self.context_id,
            depth=self.depth + 1,
            limits=limits or self.limits,
        )
        for name in names:
            child.set_variable(
                name, self.variables[name], sensitivity=self.sensitivity_of(name), written_at=self.written_at.get(name)
            )
        child.inherited = {name: copy.deepcopy(self.variables[name]) for name in names}
        return child

    def child_changes(self) -> dict[str, Any]:
        """What a child brings back on merge: the variables it added or changed since it was created."""
        return {
            name: value
            for name, value in self.variables.items()
            if name not in self.inherited or not same_json(self.inherited[name], value)
        }

    def merge_child(
        self,
        child: Self,
        *,
        default: ConflictResolutionStrategy | str = ConflictResolutionStrategy.CHILD_WINS,
        per_variable: Mapping[str, ConflictResolutionStrategy | str] | None = None,
    ) -> list[VariableConflict]:
        """Merge a child's changes into this context by the given strategies; returns the conflicts resolved.

        A conflict is a variable the child changed or added whose value differs from the one this
        context holds now. Under FAIL nothing is merged and MergeConflict names the variables.
        """
        if child.parent_id != self.context_id:
            raise InvalidValue(f"context {child.context_id} is not a child of {self.context_id}")
        incoming = child.child_changes()
        mine = {**self.intermediate, **self.variables}
        result = resolve_variable_conflicts(
            # Only what the child brings: a merge costs what it merges, not the size of this context.
            current={name: mine[name] for name in incoming if name in mine},
            incoming=incoming,
            default=default,
            per_variable=per_variable,
            current_written_at=self.written_at,
            incoming_written_at=child.written_at,
        )
        changed = {name: value for name, value in result.values.items() if name in incoming}
        levels = {
            name: DataSensitivity.highest(self.sensitivity_of(name), child.sensitivity_of(name)) for name in changed
        }
        sizes = {("variables", name): json_size(name, value) for name, value in changed.items()}
        self._check_limits(sizes)
        for name, value in changed.items():
            winner_time = child.written_at.get(name) if same_json(value, incoming[name]) else self.written_at.get(name)
            self.set_variable(name, value, sensitivity=levels[name], written_at=winner_time)
        for name in child.variables.keys() & self.sensitivity_map.keys():
            # A child may have raised a variable's sensitivity without changing its value.
            self.raise_sensitivity(name, DataSensitivity(child.sensitivity_of(name)))
        for declaration in child.exports:
            if declaration not in self.exports:
                self.exports.append(declaration)
        return result.conflicts
