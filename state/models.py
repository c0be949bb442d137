"""The state model of the design document: RunContext and the types around it.

Pure data and rules; nothing here does I/O. Values are plain JSON (dicts, lists, strings,
numbers, booleans, null), the one format every tier holds.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from state.applied import AppliedSteps
from state.conflicts import (
    ConflictResolutionStrategy,
    VariableConflict,
    resolve_variable_conflicts,
)
from state.errors import InvalidValue, LimitExceeded, SensitivityViolation
from state.limits import MAX_TEXT_LENGTH, NAME_PATTERN, check_name, json_size, same_json

Scope = Literal["variables", "intermediate"]


class DataSensitivity(str, Enum):
    """How carefully a value must be handled; ordered from least to most sensitive."""

    PUBLIC = "public"
    INTERNAL = "internal"
    CONFIDENTIAL = "confidential"
    SECRET = "secret"

    @property
    def rank(self) -> int:
        return _SENSITIVITY_ORDER.index(self)

    @classmethod
    def highest(cls, *levels: DataSensitivity) -> DataSensitivity:
        return max(levels, key=lambda level: level.rank)

    @property
    def masked(self) -> bool:
        """Whether values of this level are hidden in logs, task arguments and the CLI."""
        return self.rank >= DataSensitivity.CONFIDENTIAL.rank


_SENSITIVITY_ORDER = [DataSensitivity.PUBLIC, DataSensitivity.INTERNAL, DataSensitivity.CONFIDENTIAL, DataSensitivity.SECRET]


class ResourceLimits(BaseModel):
    model_config = ConfigDict(frozen=True)

    max_variables: int = Field(default=10_000, ge=1)
    max_value_bytes: int = Field(default=1 << 20, ge=1)
    max_context_bytes: int = Field(default=16 << 20, ge=1)
    max_child_depth: int = Field(default=16, ge=0)


class StateCacheConfig(BaseModel):
    """Sizes, lifetimes and retries of the tiers; the one place their defaults are declared."""

    model_config = ConfigDict(frozen=True)

    l1_contexts: int = Field(default=1000, ge=1, description="contexts each process keeps in its LRU")
    l1_configs: int = Field(default=1000, ge=1, description="routine definitions and configurations per process")
    l1_config_ttl_s: float = Field(
        default=30.0, gt=0, description="longest a process serves a configuration it missed an invalidation for"
    )
    l2_context_ttl_s: int = Field(default=900, ge=1, description="TTL of a clean context entry in Redis")
    l2_config_ttl_s: int = Field(default=3600, ge=1, description="TTL of a routine or configuration in Redis")
    l1_update_max_bytes: int = Field(
        default=16384, ge=0, description="a step's commit carries contexts up to this size to every process's L1"
    )
    write_behind_debounce_s: float = Field(default=0.25, ge=0, description="L3 write this long after the last change")
    write_behind_max_delay_s: float = Field(default=2.0, ge=0, description="... but never later than this after the first")
    l3_retry_attempts: int = Field(default=4, ge=1, description="tries of an L3 transaction on transient errors")
    l3_retry_base_delay_s: float = Field(default=0.05, ge=0, description="first backoff between those tries")


class ContextVariable(BaseModel):
    """One variable of a context as a caller sees it: value plus how sensitive it is."""

    name: str
    value: Any = None
    sensitivity: DataSensitivity = DataSensitivity.PUBLIC
    scope: Scope = "variables"


class ExportDestination(str, Enum):
    BLACKBOARD = "blackboard"  # SwarmSharedState.blackboard of a swarm or team
    PERSISTENT = "persistent"  # kept in L3 after the run


class ExportDeclaration(BaseModel):
    model_config = ConfigDict(frozen=True)

    variable: str = Field(pattern=NAME_PATTERN.pattern)
    destination: ExportDestination
    scope: str = Field(
        default="default", min_length=1, max_length=MAX_TEXT_LENGTH, description="blackboard scope, e.g. 'swarm:42' or 'team:ops'"
    )
    key: str | None = Field(
        default=None, min_length=1, max_length=MAX_TEXT_LENGTH, description="name under which it is exported; the variable's by default"
    )

    @property
    def export_key(self) -> str:
        return self.key or self.variable


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


class RunContext(BaseModel):
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

    # Two caches, as slots rather than pydantic private attributes (those cost ~13 us at every
    # instance pydantic builds, and every step decodes one): ``_sizes``, the values' sizes as
    # canonical JSON, filled on the first change; ``_last_steps``: (a version, the ids of the steps
    # whose commits made the versions up to it, oldest first): what lets a process holding one of
    # the versions before follow to this one from its payload alone (`RunContext.continues`).
    # Unset means not computed yet.
    __slots__ = ("_sizes", "_last_steps")

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
        return copy_

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

    def raise_sensitivity(self, name: str, level: DataSensitivity) -> None:
        """Make a variable at least as sensitive as ``level`` (sensitivity only rises)."""
        if name in self.variables or name in self.intermediate:
            if self.sensitivity_of(name).rank < level.rank:
                self.sensitivity_map[name] = level

    def set_many(self, values: Mapping[str, Any], *, written_at: Mapping[str, float] | None = None) -> None:
        """Set several variables as one change: all limits are checked before any is applied."""
        sizes = {("variables", check_name(name)): json_size(name, value) for name, value in values.items()}
        self._check_limits(sizes)
        for name, value in values.items():
            self.set_variable(name, value, written_at=(written_at or {}).get(name))

    def delete_variable(self, name: str) -> None:
        for scope in ("variables", "intermediate"):
            self._store(scope).pop(name, None)  # type: ignore[arg-type]
            self._ensure_sizes().pop((scope, name), None)
        self.written_at.pop(name, None)

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

    # ---- children -------------------------------------------------------------------------

    def create_child(
        self,
        routine_id: str,
        *,
        inherit: Iterable[str] = (),
        context_id: str | None = None,
        limits: ResourceLimits | None = None,
    ) -> RunContext:
        """A child context for a sub-routine. Only the named variables pass down, as copies."""
        if self.depth + 1 > self.limits.max_child_depth:
            raise LimitExceeded(routine_id, "max_child_depth", self.depth + 1, self.limits.max_child_depth)
        names = list(dict.fromkeys(inherit))
        missing = [name for name in names if name not in self.variables]
        if missing:
            raise InvalidValue(f"cannot inherit {', '.join(map(repr, missing))}: not a variable of {self.context_id}")
        child = RunContext(
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
        child: RunContext,
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
        result = resolve_variable_conflicts(
            current={**self.intermediate, **self.variables},
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
            self.sensitivity_map[name] = DataSensitivity.highest(self.sensitivity_of(name), child.sensitivity_of(name))
        for declaration in child.exports:
            if declaration not in self.exports:
                self.exports.append(declaration)
        return result.conflicts

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
        total = sum(size for (_, name), size in sizes.items() if name not in replaced) + sum(new_sizes.values())
        if total > limits.max_context_bytes:
            name = next(iter(new_sizes))[1]
            raise LimitExceeded(name, "max_context_bytes", total, limits.max_context_bytes)
