"""Routine definitions: the YAML/JSON a user writes, validated by pydantic before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from state.errors import InvalidRoutine
from state.limits import NAME_PATTERN
from state.models import ConflictResolutionStrategy, DataSensitivity, ExportDestination
from tasks.actions import check_action

STEP_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariableSpec(_Strict):
    value: Any = None
    sensitivity: DataSensitivity = DataSensitivity.PUBLIC


class MergeSpec(_Strict):
    """How a sub-routine's changes merge back: a default strategy and per-variable ones."""

    default: ConflictResolutionStrategy = ConflictResolutionStrategy.CHILD_WINS
    variables: dict[str, ConflictResolutionStrategy] = Field(default_factory=dict)


class ActionStep(_Strict):
    id: str = Field(pattern=STEP_ID)
    action: str
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_action(self) -> "ActionStep":
        check_action(self.action, self.args)
        return self


class ParallelStep(_Strict):
    id: str = Field(pattern=STEP_ID)
    parallel: list[Annotated[list["Step"], Field(min_length=1)]] = Field(min_length=1)


def _routine_kind(raw: Any) -> str:
    return "reference" if isinstance(raw, str) else "inline"


class SubRoutineStep(_Strict):
    id: str = Field(pattern=STEP_ID)
    # A file or stored name (replaced by its definition when loaded), or the definition inline.
    routine: Annotated[
        Union[Annotated[str, Tag("reference")], Annotated["Routine", Tag("inline")]],
        Discriminator(_routine_kind),
    ]
    inherit: list[str] = Field(default_factory=list)
    merge: MergeSpec = Field(default_factory=MergeSpec)


def _step_kind(raw: Any) -> str | None:
    """Which kind of step a mapping is, by the key that only that kind has."""
    if isinstance(raw, BaseModel):
        return type(raw).__name__
    if isinstance(raw, dict):
        kinds = [kind for key, kind in _STEP_KEYS.items() if key in raw]
        return kinds[0] if len(kinds) == 1 else None
    return None


_STEP_KEYS = {"action": "ActionStep", "parallel": "ParallelStep", "routine": "SubRoutineStep"}

Step = Annotated[
    Union[
        Annotated[ActionStep, Tag("ActionStep")],
        Annotated[ParallelStep, Tag("ParallelStep")],
        Annotated[SubRoutineStep, Tag("SubRoutineStep")],
    ],
    Discriminator(
        _step_kind,
        custom_error_type="step_kind",
        custom_error_message="a step needs exactly one of 'action', 'parallel' or 'routine'",
    ),
]


class ExportSpec(_Strict):
    variable: str
    destination: ExportDestination
    scope: str = "default"
    key: str | None = None


class Routine(_Strict):
    name: str = Field(pattern=NAME_PATTERN.pattern)
    variables: dict[str, Union[VariableSpec, Any]] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)
    exports: list[ExportSpec] = Field(default_factory=list)
    # How concurrent `set`s of one variable (parallel branches) are resolved.
    concurrency: MergeSpec = Field(default_factory=lambda: MergeSpec(default=ConflictResolutionStrategy.LAST_WRITER_WINS))

    @field_validator("variables", mode="before")
    @classmethod
    def _variable_specs(cls, raw: Any) -> Any:
        """`{value: ..., sensitivity: ...}` declares sensitivity; anything else is a plain value."""
        if not isinstance(raw, dict):
            return raw
        specs = {}
        for name, value in raw.items():
            if not NAME_PATTERN.match(str(name)):
                raise ValueError(f"variable name {name!r} is not valid (letters, digits, '_', '.', '-')")
            is_spec = isinstance(value, dict) and "value" in value and set(value) <= {"value", "sensitivity"}
            try:
                specs[name] = VariableSpec.model_validate(value) if is_spec else VariableSpec(value=value)
            except ValidationError as exc:
                problem = exc.errors()[0]
                raise ValueError(f"{name}.{'.'.join(map(str, problem['loc']))}: {problem['msg']}") from None
        return specs

    @model_validator(mode="after")
    def _unique_step_ids(self) -> "Routine":
        seen: set[str] = set()
        for step in iter_steps(self.steps):
            if step.id in seen:
                raise ValueError(f"step id {step.id!r} is used more than once")
            seen.add(step.id)
        return self

    def initial_variables(self) -> dict[str, VariableSpec]:
        return {name: spec if isinstance(spec, VariableSpec) else VariableSpec(value=spec) for name, spec in self.variables.items()}


def iter_steps(steps: list[Any]):
    """Every step of a list, depth first, including those inside parallel groups (not sub-routines)."""
    for step in steps:
        yield step
        if isinstance(step, ParallelStep):
            for branch in step.parallel:
                yield from iter_steps(branch)


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("ActionStep", "ParallelStep", "SubRoutineStep", "reference", "inline") or "[" in str(part):
            continue  # union branch names that pydantic puts in the path
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _explain(source: str, error: ValidationError) -> InvalidRoutine:
    first = error.errors()[0]
    where = _location(first["loc"])
    return InvalidRoutine(f"{source}: {where}: {first['msg'].removeprefix('Value error, ')}")


def parse_routine(data: Any, *, source: str = "<routine>") -> Routine:
    try:
        return Routine.model_validate(data)
    except ValidationError as exc:
        raise _explain(source, exc) from None


def read_routine_file(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidRoutine(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise InvalidRoutine(f"{path}: not valid JSON: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidRoutine(f"{path}: not valid YAML{where}: {problem}") from None


def load_routine(path: Path | str, resolve_stored=None, _seen: tuple[Path, ...] = ()) -> Routine:
    """Load and validate a routine file, with its sub-routines (files relative to it, or stored names).

    ``resolve_stored(name)`` returns a stored routine's definition (a dict) or None.
    """
    path = Path(path).resolve()
    if path in _seen:
        raise InvalidRoutine(f"{path}: sub-routines include each other in a cycle")
    routine = parse_routine(read_routine_file(path), source=str(path))
    return _resolve_subroutines(routine, path, resolve_stored, (*_seen, path))


def _resolve_subroutines(routine: Routine, path: Path, resolve_stored, seen: tuple[Path, ...]) -> Routine:
    def resolve(steps: list[Any]) -> list[Any]:
        out = []
        for step in steps:
            if isinstance(step, ParallelStep):
                step = step.model_copy(update={"parallel": [resolve(branch) for branch in step.parallel]})
            elif isinstance(step, SubRoutineStep) and isinstance(step.routine, str):
                step = step.model_copy(update={"routine": _load_reference(step, path, resolve_stored, seen)})
            out.append(step)
        return out

    return routine.model_copy(update={"steps": resolve(list(routine.steps))})


def _load_reference(step: SubRoutineStep, path: Path, resolve_stored, seen: tuple[Path, ...]) -> Routine:
    reference = str(step.routine)
    candidate = (path.parent / reference).resolve()
    if candidate.suffix in (".yaml", ".yml", ".json") or candidate.exists():
        if not candidate.exists():
            raise InvalidRoutine(f"{path}: step {step.id!r}: sub-routine file {reference!r} does not exist")
        return load_routine(candidate, resolve_stored, seen)
    stored = resolve_stored(reference) if resolve_stored else None
    if stored is None:
        raise InvalidRoutine(f"{path}: step {step.id!r}: no file or stored routine named {reference!r}")
    return parse_routine(stored, source=f"stored routine {reference!r}")


ParallelStep.model_rebuild()
SubRoutineStep.model_rebuild()
Routine.model_rebuild()
