"""Conflict resolution when merging a child into its parent, or two concurrent versions of a context.

Pure functions over plain mappings: deterministic, no clocks read, no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydantic import BaseModel

from state.errors import InvalidValue, MergeConflict
from state.limits import same_json


class ConflictResolutionStrategy(str, Enum):
    PARENT_WINS = "PARENT_WINS"
    CHILD_WINS = "CHILD_WINS"
    MERGE_OBJECTS = "MERGE_OBJECTS"
    LAST_WRITER_WINS = "LAST_WRITER_WINS"
    FAIL = "FAIL"


class VariableConflict(BaseModel):
    """A variable that differed on both sides of a merge, and how it was resolved."""

    name: str
    current_value: Any
    incoming_value: Any
    resolved_value: Any
    strategy: ConflictResolutionStrategy


Strategy = ConflictResolutionStrategy
_MISSING = object()


@dataclass
class MergeResult:
    """The merged variables and the conflicts that were resolved on the way."""

    values: dict[str, Any]
    conflicts: list[VariableConflict] = field(default_factory=list)


def deep_merge(current: Any, incoming: Any) -> Any:
    """MERGE_OBJECTS: mappings merge key by key, recursively; elsewhere the incoming value wins."""
    if isinstance(current, Mapping) and isinstance(incoming, Mapping):
        merged = {key: copy.deepcopy(value) for key, value in current.items()}
        for key, value in incoming.items():
            merged[key] = deep_merge(current[key], value) if key in current else copy.deepcopy(value)
        return merged
    return copy.deepcopy(incoming)


def _as_strategy(value: Strategy | str, what: str) -> Strategy:
    try:
        return Strategy(value)
    except ValueError:
        choices = ", ".join(strategy.value for strategy in Strategy)
        raise InvalidValue(f"{what}: unknown merge strategy {value!r} (one of {choices})") from None


def _strategy(name: str, default: Strategy, per_variable: Mapping[str, Strategy | str]) -> Strategy:
    return _as_strategy(per_variable.get(name, default), f"merge strategy for {name!r}")


def resolve_variable_conflicts(
    current: Mapping[str, Any],
    incoming: Mapping[str, Any],
    *,
    default: Strategy | str = Strategy.CHILD_WINS,
    per_variable: Mapping[str, Strategy | str] | None = None,
    base: Mapping[str, Any] | None = None,
    current_written_at: Mapping[str, float] | None = None,
    incoming_written_at: Mapping[str, float] | None = None,
) -> MergeResult:
    """Apply ``incoming`` changes onto ``current`` and resolve where both disagree.

    ``current`` is the parent (or the version committed meanwhile); ``incoming`` holds only
    the variables the child (or the refused writer) changed. With ``base`` (the version the
    writer started from), a variable that ``current`` still holds at its base value is not a
    conflict: only the writer changed it. Without ``base``, every differing value is a conflict.
    LAST_WRITER_WINS compares the write times; a tie, or a missing time, goes to ``incoming``.
    """
    default = _as_strategy(default, "default merge strategy")
    per_variable = per_variable or {}
    current_times = current_written_at or {}
    incoming_times = incoming_written_at or {}
    merged = {name: copy.deepcopy(value) for name, value in current.items()}
    conflicts: list[VariableConflict] = []
    failed: list[str] = []

    for name in sorted(incoming):
        theirs = incoming[name]
        ours = current.get(name, _MISSING)
        if ours is _MISSING or same_json(ours, theirs):
            merged[name] = copy.deepcopy(theirs)
            continue
        if base is not None and name in base and same_json(base[name], ours):
            merged[name] = copy.deepcopy(theirs)  # only the incoming side changed it
            continue
        strategy = _strategy(name, default, per_variable)
        if strategy is Strategy.FAIL:
            failed.append(name)
            continue
        if strategy is Strategy.PARENT_WINS:
            resolved = ours
        elif strategy is Strategy.CHILD_WINS:
            resolved = theirs
        elif strategy is Strategy.MERGE_OBJECTS:
            resolved = deep_merge(ours, theirs)
        else:  # LAST_WRITER_WINS
            ours_at, theirs_at = current_times.get(name), incoming_times.get(name)
            resolved = ours if ours_at is not None and theirs_at is not None and ours_at > theirs_at else theirs
        merged[name] = copy.deepcopy(resolved)
        conflicts.append(
            VariableConflict(
                name=name, current_value=ours, incoming_value=theirs, resolved_value=resolved, strategy=strategy
            )
        )
    if failed:
        raise MergeConflict(failed)
    return MergeResult(values=merged, conflicts=conflicts)
