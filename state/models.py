"""The state model of the design document: RunContext and the types around it (sensitivity, limits,
exports and the cache's sizes are in modules of their own, and importable from here too).

Pure data and rules; nothing here does I/O. Values are plain JSON (dicts, lists, strings,
numbers, booleans, null), the one format every tier holds.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from state.applied import AppliedSteps
from state.children import ChildContexts
from state.config import ResourceLimits, StateCacheConfig
from state.conflicts import ConflictResolutionStrategy, VariableConflict
from state.errors import InvalidValue, LimitExceeded, SensitivityViolation
from state.exports import ExportDeclaration, ExportDestination
from state.limits import check_name, json_size
from state.sensitivity import DataSensitivity

Scope = Literal["variables", "intermediate"]


class ContextVariable(BaseModel):
    """One variable of a context as a caller sees it: value plus how sensitive it is."""

    name: str
    value: Any = None
    sensitivity: DataSensitivity = DataSensitivity.PUBLIC
    scope: Scope = "variables"


class RunContextInit(BaseModel):
    """What the run state machine needs to create a RunContext."""

    run_id: str
    routine_id: str
    context_id: str | None = None
    variables: dict[str, Any] = Field(default_factory=dict)
    sensitivity_map: dict[str, DataSensitivity] = Field(default_factory=dict)
    intermediate: dict[str, Any] = Field(default_factory=dict)
    exports: list[ExportDeclaration] = Field(default_factory=list)
    limits: ResourceLimits = Field(default_factory=ResourceLimits)


LAST_STEPS_KEPT = 8  # commits a context remembers the steps of: how far behind a process may follow it
REFERENCE_BYTES = 100  # what a reference to a value stored by itself takes, at most (`state.blobs`)


class RunContext(ChildContexts, BaseModel):
    """The state of one routine execution (or sub-routine: then ``parent_id`` is set).

    ``version`` is the number of committed changes; the store raises it on commit. Methods
    that change the context check every limit first, so a refused change leaves it as it was.
    """

    context_id: str
    run_id: str
    routine_id: str
    parent_id: str | None = None
    depth: int = 0
    version: int = 0
    # The run's lineage: raised by a rewind, after which versions restart from L3's (fencing).
    epoch: int = 1
    variables: dict[str, Any] = Field(default_factory=dict)
    intermediate: dict[str, Any] = Field(default_factory=dict)
    exports: list[ExportDeclaration] = Field(default_factory=list)
    sensitivity_map: dict[str, DataSensitivity] = Field(default_factory=dict)
    limits: ResourceLimits = Field(default_factory=ResourceLimits)
    # Last write time of each variable, for LAST_WRITER_WINS.
    written_at: dict[str, float] = Field(default_factory=dict)
    # For a child: the values it inherited, so merge-back knows what the child changed.
    inherited: dict[str, Any] = Field(default_factory=dict)
    # Steps whose changes this context holds, committed with them: a step is applied at most once.
    # Immutable and shared by copies (`state.applied`): extending it costs the same at any length.
    applied_steps: AppliedSteps = Field(default_factory=AppliedSteps)

    # Two caches, as slots rather than pydantic private attributes (those cost time at every
    # instance pydantic builds, and every step decodes one): ``_sizes``, the values' sizes as
    # canonical JSON, filled on the first change; ``_last_steps``: (a version, the ids of the steps
    # whose commits made the versions up to it, oldest first): what lets a process holding one of
    # the versions before follow to this one from its payload alone (`RunContext.continues`).
    # Unset means not computed yet.
    # ``_touched``: the names a working copy was told to change (its commit's history entry).
    # ``_detached``, ``_dropped``: its large values kept beside its L2 payload (`state.detached`).
    __slots__ = ("_sizes", "_last_steps", "_touched", "_detached", "_dropped")

    # ---- creation -------------------------------------------------------------------------

    @classmethod
    def from_init(cls, init: RunContextInit) -> RunContext:
        ctx = cls(
            context_id=init.context_id or init.run_id,
            run_id=init.run_id,
            routine_id=init.routine_id,
            limits=init.limits,
            exports=list(init.exports),
        )
        for scope, values in (("variables", init.variables), ("intermediate", init.intermediate)):
            for name, value in values.items():
                mapped = init.sensitivity_map.get(name, DataSensitivity.PUBLIC)
                if isinstance(value, ContextVariable):
                    level = DataSensitivity.highest(value.sensitivity, DataSensitivity(mapped))
                    ctx.set_variable(name, value.value, sensitivity=level, scope=value.scope)
                else:
                    ctx.set_variable(name, value, sensitivity=mapped, scope=scope)  # type: ignore[arg-type]
        return ctx

    # ---- reading --------------------------------------------------------------------------

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.variables:
            return self.variables[name]
        return self.intermediate.get(name, default)

    def sensitivity_of(self, name: str) -> DataSensitivity:
        return self.sensitivity_map.get(name, DataSensitivity.PUBLIC)

    def variable(self, name: str) -> ContextVariable:
        scope: Scope = "variables" if name in self.variables else "intermediate"
        if name not in self.variables and name not in self.intermediate:
            raise InvalidValue(f"variable {name!r}: not in context {self.context_id}")
        return ContextVariable(name=name, value=self.get(name), sensitivity=self.sensitivity_of(name), scope=scope)

    @property
    def holds_sensitive(self) -> bool:
        """Whether any variable is confidential or secret."""
        return any(DataSensitivity(level).masked for level in self.sensitivity_map.values())

    def masked_variables(self) -> dict[str, Any]:
        """Variables with confidential and secret values replaced by a mask, for display."""
        return {
            name: ("***" if self.sensitivity_of(name).masked else value) for name, value in self.variables.items()
        }

    def working_copy(self) -> RunContext:
        """A copy to change: containers are copied, values shared (every change replaces a value, never edits it)."""
        copy_ = self.model_copy(
            update={
                "variables": dict(self.variables),
                "intermediate": dict(self.intermediate),
                "exports": list(self.exports),
                "sensitivity_map": dict(self.sensitivity_map),
                "written_at": dict(self.written_at),
                "applied_steps": self._applied(),  # immutable: shared, extended by plus
            }
        )
        sizes = getattr(self, "_sizes", None)
        copy_._sizes = None if sizes is None else dict(sizes)
        copy_._last_steps = getattr(self, "_last_steps", None)
        copy_._touched = {}
        copy_._detached = getattr(self, "_detached", None)
        copy_._dropped = ()
        return copy_

    def touched(self) -> list[str]:
        """The names changed (set, deleted or made more sensitive) since this copy was made."""
        return list(getattr(self, "_touched", None) or ())

    def _touch(self, name: str) -> None:
        touched = getattr(self, "_touched", None)
        if touched is None:
            touched = self._touched = {}
        touched[name] = None

    # ---- applied steps --------------------------------------------------------------------

    def has_applied(self, step_id: str) -> bool:
        """Whether the context holds ``step_id``'s changes (O(1), whatever the run's length)."""
        return step_id in self._applied()

    def mark_applied(self, step_id: str) -> None:
        """Record that this (working) context holds ``step_id``'s changes (O(1): the ids before it
        are shared with the context this one was copied from)."""
        self.applied_steps = self._applied().plus(step_id)

    def continues(self, previous: RunContext, steps: Sequence[str]) -> None:
        """This context is ``previous`` plus the commits of ``steps`` (other processes' commits, one
        version each): take its applied steps, then the steps."""
        applied = previous._applied()
        for step_id in steps:
            applied = applied.plus(step_id)
        self.applied_steps = applied
        self._last_steps = (self.version, (*previous.last_steps(), *steps)[-LAST_STEPS_KEPT:])

    def _applied(self) -> AppliedSteps:
        """The applied steps as `AppliedSteps` (a list assigned to the field is taken in here)."""
        applied = self.applied_steps
        if not isinstance(applied, AppliedSteps):
            applied = self.applied_steps = AppliedSteps(applied)
        return applied

    def last_steps(self) -> tuple[str, ...]:
        """The ids of the steps whose commits made the last versions of this context, oldest first,
        the last one's commit made ``version`` (empty if unknown, e.g. read from a tier)."""
        known = getattr(self, "_last_steps", None)
        return known[1] if known is not None and known[0] == self.version else ()

    def take_last_steps(self, scored: Sequence[tuple[int, str]]) -> None:
        """Take what a tier keeps: its newest applied steps with the version each one's commit made,
        oldest first; those whose versions lead one by one to ``version`` count."""
        steps: list[str] = []
        for version, step_id in reversed(scored):
            if version != self.version - len(steps) or len(steps) == LAST_STEPS_KEPT:
                break
            steps.append(step_id)
        self._last_steps = (self.version, tuple(reversed(steps)))

    def note_step_commit(self, step_id: str) -> None:
        """This (working) context becomes ``version`` by the commit of ``step_id``."""
        known = getattr(self, "_last_steps", None)
        before = known[1][1 - LAST_STEPS_KEPT :] if known is not None and known[0] == self.version - 1 else ()
        self._last_steps = (self.version, (*before, step_id))

    # ---- changing -------------------------------------------------------------------------

    def set_variable(
        self,
        name: str,
        value: Any,
        *,
        sensitivity: DataSensitivity | str | None = None,
        scope: Scope = "variables",
        written_at: float | None = None,
    ) -> None:
        """Set one variable after checking its name, size and sensitivity; refused changes change nothing."""
        check_name(name)
        if scope not in ("variables", "intermediate"):
            raise InvalidValue(f"variable {name!r}: scope must be 'variables' or 'intermediate', got {scope!r}")
        level = self._checked_sensitivity(name, sensitivity)
        size = json_size(name, value)
        self._check_limits({(scope, name): size})
        other = "intermediate" if scope == "variables" else "variables"
        self._store(scope).__setitem__(name, copy.deepcopy(value))
        self._store(other).pop(name, None)  # a name lives in one scope only
        self._ensure_sizes().pop((other, name), None)
        self._ensure_sizes()[(scope, name)] = size
        self.sensitivity_map[name] = level
        self.written_at[name] = time.time() if written_at is None else written_at
        self._touch(name)

    def raise_sensitivity(self, name: str, level: DataSensitivity) -> None:
        """Make a variable at least as sensitive as ``level`` (sensitivity only rises)."""
        if name in self.variables or name in self.intermediate:
            if self.sensitivity_of(name).rank < level.rank:
                self.sensitivity_map[name] = level
                self._touch(name)

    def set_many(self, values: Mapping[str, Any], *, written_at: Mapping[str, float] | None = None) -> None:
        """Set several variables as one change: all limits are checked before any is applied."""
        sizes = {("variables", check_name(name)): json_size(name, value) for name, value in values.items()}
        self._check_limits(sizes)
        for name, value in values.items():
            self.set_variable(name, value, written_at=(written_at or {}).get(name))

    def hold_by_reference(self, scope: str, name: str, reference: dict[str, Any]) -> None:
        """Put a stored value's reference (`state.blobs`) in its place: the same value, held by reference."""
        self._store(scope)[name] = reference
        self._ensure_sizes()[(scope, name)] = json_size(name, reference)

    def delete_variable(self, name: str) -> None:
        for scope in ("variables", "intermediate"):
            self._store(scope).pop(name, None)  # type: ignore[arg-type]
            self._ensure_sizes().pop((scope, name), None)
        self.written_at.pop(name, None)
        self._touch(name)

    def mark_for_export(
        self,
        variable: str,
        destination: ExportDestination | str,
        *,
        scope: str = "default",
        key: str | None = None,
    ) -> ExportDeclaration:
        """Declare that a variable is exported when the run finalizes."""
        check_name(variable)
        try:
            destination = ExportDestination(destination)
        except ValueError:
            choices = ", ".join(d.value for d in ExportDestination)
            raise InvalidValue(f"export of {variable!r}: unknown destination {destination!r} (one of {choices})") from None
        declaration = ExportDeclaration(variable=variable, destination=destination, scope=scope, key=key)
        if declaration not in self.exports:
            self.exports.append(declaration)
        return declaration

    # ---- internals ------------------------------------------------------------------------

    def _store(self, scope: str) -> dict[str, Any]:
        return self.variables if scope == "variables" else self.intermediate

    def _ensure_sizes(self) -> dict[tuple[str, str], int]:
        if getattr(self, "_sizes", None) is None:
            self._sizes = {
                (scope, name): json_size(name, value)
                for scope in ("variables", "intermediate")
                for name, value in self._store(scope).items()
            }
        return self._sizes

    def _checked_sensitivity(self, name: str, requested: DataSensitivity | str | None) -> DataSensitivity:
        current = self.sensitivity_map.get(name)
        if requested is None:
            return current or DataSensitivity.PUBLIC
        try:
            level = DataSensitivity(requested)
        except ValueError:
            choices = ", ".join(level.value for level in DataSensitivity)
            raise InvalidValue(f"variable {name!r}: unknown sensitivity {requested!r} (one of {choices})") from None
        if current is not None and level.rank < current.rank:
            raise SensitivityViolation(
                f"variable {name!r}: sensitivity cannot be lowered from {current.value} to {level.value}"
            )
        return level

    def _check_limits(self, new_sizes: Mapping[tuple[str, str], int]) -> None:
        """Check a set of (scope, name) -> size writes against the limits before applying any."""
        sizes = self._ensure_sizes()
        limits = self.limits
        for (_, name), size in new_sizes.items():
            if size > limits.max_value_bytes:
                raise LimitExceeded(name, "max_value_bytes", size, limits.max_value_bytes)
        names_before = {name for (_, name) in sizes}
        added = [name for (_, name) in new_sizes if name not in names_before]
        if added and len(names_before) + len(set(added)) > limits.max_variables:
            raise LimitExceeded(added[0], "max_variables", len(names_before) + len(set(added)), limits.max_variables)
        replaced = {name for (_, name) in new_sizes}
        # A value over value_ref_bytes is held by reference (`state.blobs`): the context holds that.
        def held(size: int) -> int:
            return min(size, REFERENCE_BYTES) if size > limits.value_ref_bytes else size

        total = sum(held(size) for (_, name), size in sizes.items() if name not in replaced) + sum(map(held, new_sizes.values()))
        if total > limits.max_context_bytes:
            name = next(iter(new_sizes))[1]
            raise LimitExceeded(name, "max_context_bytes", total, limits.max_context_bytes)


__all__ = [
    "LAST_STEPS_KEPT",
    "REFERENCE_BYTES",
    "ConflictResolutionStrategy",
    "ContextVariable",
    "DataSensitivity",
    "ExportDeclaration",
    "ExportDestination",
    "ResourceLimits",
    "RunContext",
    "RunContextInit",
    "StateCacheConfig",
    "VariableConflict",
]
