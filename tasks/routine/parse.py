"""Validating a routine definition into a `Routine`, with messages that name the file, the place in it
and the problem."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from state.errors import InvalidRoutine
from state.limits import MAX_NESTING
from tasks.routine.bounds import check_definition
from tasks.routine.model import _STEP_KEYS, ActionStep, ForEachStep, ParallelStep, Routine, SubRoutineStep

def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("ActionStep", "ParallelStep", "SubRoutineStep", "ForEachStep", "reference", "definition") or "[" in str(part):
            continue  # union branch names that pydantic puts in the path
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _explain(source: str, error: ValidationError) -> InvalidRoutine:
    first = error.errors()[0]
    where = _location(first["loc"])
    problem = _step_kind_problem(first["input"]) if first["type"] == "step_kind" else None
    return InvalidRoutine(f"{source}: {where}: {problem or first['msg'].removeprefix('Value error, ')}")


def _step_kind_problem(raw: Any) -> str | None:
    """What is wrong with a step whose kind cannot be told: a key misspelt, or two kinds in one."""
    *first, last = (f"'{key}'" for key in _STEP_KEYS)
    kinds = f"{', '.join(first)} or {last}"
    if not isinstance(raw, dict):
        return f"a step is a mapping with one of {kinds}, not a {type(raw).__name__}"
    present = [key for key in _STEP_KEYS if key in raw]
    if len(present) > 1:
        return f"a step has one of {kinds}, this one has {' and '.join(map(repr, present))}"
    known = {
        field.alias or name for kind in (ActionStep, ParallelStep, SubRoutineStep, ForEachStep) for name, field in kind.model_fields.items()
    }
    unknown = sorted(str(key) for key in raw if key not in known)
    if unknown:
        return f"unknown key {', '.join(repr(key[:40]) for key in unknown)} (a step needs one of {kinds})"
    return None


def parse_routine(data: Any, *, source: str = "<routine>", stored: bool = False) -> Routine:
    """Validate a routine definition (a mapping, as from a file or the API) into a Routine.

    ``stored``: read back from the store (by a worker, or a read model), where user actions are not
    checked against this process's RUNCTX_ACTION_MODULES: the process that runs a step does that.
    """
    check_definition(data, source)
    return _validated(data, source, stored=stored)


def _validated(data: Any, source: str, *, stored: bool = False) -> Routine:
    try:
        return Routine.model_validate(data, context={"stored": stored})
    except ValidationError as exc:
        raise _explain(source, exc) from None
    except RecursionError:
        raise InvalidRoutine(f"{source}: nests deeper than {MAX_NESTING} levels") from None


