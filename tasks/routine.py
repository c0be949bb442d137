"""Routine definitions: the YAML/JSON a user writes, validated by pydantic before anything runs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from state.errors import InvalidRoutine
from state.limits import MAX_NESTING, MAX_TEXT_LENGTH, NAME_PATTERN, shown
from state.models import ConflictResolutionStrategy, DataSensitivity, ExportDestination
from tasks.actions import check_action

STEP_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariableSpec(_Strict):
    value: Any = None
    sensitivity: DataSensitivity = DataSensitivity.PUBLIC
    # Declared without a value (``{sensitivity: secret}``): the value must be given at submit.
    required: bool = False

    @model_serializer(mode="wrap")
    def _as_written(self, handler: Any) -> Any:
        """Stored as written: ``{sensitivity}`` for a declaration without value, else value + sensitivity."""
        if self.required:
            return {"sensitivity": self.sensitivity.value}
        data = handler(self)
        data.pop("required", None)
        return data


class MergeSpec(_Strict):
    """How a sub-routine's changes merge back: a default strategy and per-variable ones."""

    default: ConflictResolutionStrategy = ConflictResolutionStrategy.CHILD_WINS
    variables: dict[str, ConflictResolutionStrategy] = Field(default_factory=dict)


class ActionStep(_Strict):
    id: str = Field(pattern=STEP_ID)
    action: str
    args: dict[str, Any] = Field(default_factory=dict)
    # In an inline routine, `false` makes this step a task of its own (e.g. a slow or risky action).
    inline: bool | None = None
    # Need-to-know: the secret variables this step reads (to other steps they are absent).
    reads: list[Annotated[str, Field(pattern=NAME_PATTERN.pattern)]] = Field(default_factory=list)
    # What this step writes is as sensitive as the most sensitive value it read, except these.
    declassify: list[Annotated[str, Field(pattern=NAME_PATTERN.pattern)]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_action(self, info: ValidationInfo) -> ActionStep:
        # A stored routine was checked against the allow-list of the process that loaded it; the
        # process that runs a step checks its own when it imports the action.
        check_action(self.action, self.args, allow_list=not (info.context or {}).get("stored"))
        return self


class ParallelStep(_Strict):
    id: str = Field(pattern=STEP_ID)
    parallel: list[Annotated[list[Step], Field(min_length=1)]] = Field(min_length=1)


def _routine_kind(raw: Any) -> str:
    return "reference" if isinstance(raw, str) else "definition"


class SubRoutineStep(_Strict):
    id: str = Field(pattern=STEP_ID)
    # A file or stored name (replaced by its definition when loaded), or the definition inline.
    routine: Annotated[
        Annotated[str, Tag("reference")] | Annotated[Routine, Tag("definition")],
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
    Annotated[ActionStep, Tag("ActionStep")] | Annotated[ParallelStep, Tag("ParallelStep")] | Annotated[SubRoutineStep, Tag("SubRoutineStep")],
    Discriminator(
        _step_kind,
        custom_error_type="step_kind",
        custom_error_message="a step needs exactly one of 'action', 'parallel' or 'routine'",
    ),
]


class ExportSpec(_Strict):
    variable: str = Field(pattern=NAME_PATTERN.pattern)
    destination: ExportDestination
    scope: str = Field(default="default", min_length=1, max_length=MAX_TEXT_LENGTH)
    key: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)


class Routine(_Strict):
    name: str = Field(pattern=NAME_PATTERN.pattern)
    variables: dict[str, VariableSpec | Any] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)
    exports: list[ExportSpec] = Field(default_factory=list)
    # How concurrent `set`s of one variable (parallel branches) are resolved.
    concurrency: MergeSpec = Field(default_factory=lambda: MergeSpec(default=ConflictResolutionStrategy.LAST_WRITER_WINS))
    # Inline: a step's sequential successor in the same context runs in the same task, right after
    # it, while that task has run less than `inline_budget_s` (each step still commits on its own).
    inline: bool = False
    inline_budget_s: float = Field(default=0.05, gt=0, le=60)

    @field_validator("variables", mode="before")
    @classmethod
    def _variable_specs(cls, raw: Any) -> Any:
        """`{value: ..., sensitivity: ...}` declares sensitivity (`{sensitivity: ...}` alone: the value
        is given at submit); anything else is a plain value. A mapping with a ``value`` or
        ``sensitivity`` key is a declaration: one with other keys (``sensitivty``) is a typo, refused
        rather than taken as a public value (a plain mapping value with such keys: ``{value: {...}}``). A
        confidential or secret value written in the routine is refused: it would be stored with the
        routine definition, in plain text."""
        if not isinstance(raw, dict):
            return raw
        specs = {}
        for name, value in raw.items():
            if not NAME_PATTERN.match(str(name)):
                raise ValueError(f"variable name {name!r} is not valid (letters, digits, '_', '.', '-')")
            declared = isinstance(value, dict) and ("sensitivity" in value or "value" in value)
            if declared and not set(value) <= {"value", "sensitivity"}:
                extra = ", ".join(sorted(str(key) for key in set(value) - {"value", "sensitivity"}))
                raise ValueError(f"{name}: a declaration takes only value and sensitivity (not {extra})")
            try:
                spec = (
                    VariableSpec.model_validate({**value, "required": "value" not in value}) if declared else VariableSpec(value=value)
                )
            except ValidationError as exc:
                problem = exc.errors()[0]
                raise ValueError(f"{name}.{'.'.join(map(str, problem['loc']))}: {problem['msg']}") from None
            if spec.sensitivity.masked and not spec.required:
                raise ValueError(
                    f"{name}: a {spec.sensitivity.value} value written in the routine would be stored with it in "
                    f"plain text; declare {{sensitivity: {spec.sensitivity.value}}} without a value and give it at "
                    "submit (runctx run --var-file)"
                )
            specs[name] = spec
        return specs

    @model_validator(mode="after")
    def _unique_step_ids(self) -> Routine:
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
        elif part in ("ActionStep", "ParallelStep", "SubRoutineStep", "reference", "definition") or "[" in str(part):
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
    known = {name for kind in (ActionStep, ParallelStep, SubRoutineStep) for name in kind.model_fields}
    unknown = sorted(str(key) for key in raw if key not in known)
    if unknown:
        return f"unknown key {', '.join(repr(key[:40]) for key in unknown)} (a step needs one of {kinds})"
    return None


MAX_ROUTINE_FILE_BYTES = 1 << 20  # a routine file, as read from disk
MAX_DEFINITION_BYTES = 1 << 20  # a routine with its sub-routines as JSON, YAML aliases expanded
MAX_ROUTINE_FILES = 256  # files read for one routine, counting each use of a sub-routine file
MAX_PATH_LENGTH = 4096  # a routine file's path, or a sub-routine reference
MAX_INTEGER_BITS = 1024  # about 300 digits: larger numbers are refused, not parsed for minutes


def check_definition(data: Any, source: str) -> int:
    """Refuse what is not plain JSON within bounds, and return its size as JSON (aliases expanded).

    Refused: nesting deeper than MAX_NESTING, NUL characters and lone surrogates, keys that are not
    strings, NaN, infinities and huge integers, YAML's non-JSON values (dates, binary, sets), and
    more than MAX_DEFINITION_BYTES once YAML aliases are expanded. Shared (aliased) parts are
    measured once and counted at every use, so a small file of nested aliases is refused without
    ever being expanded.
    """
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}

    # Where a value is, as (parent, key) links: turned into text only for an error (building a
    # path string for every value would double the cost of checking a large routine).
    Where = tuple[Any, Any] | None

    def refuse(where: Where, problem: str) -> InvalidRoutine:
        return InvalidRoutine(f"{source}: {_path_text(where) or '(top level)'}: {problem}")

    def text(value: str, where: Where) -> int:
        if "\x00" in value:
            raise refuse(where, "a string holds a NUL character (\\u0000)")
        try:
            return len(value.encode("utf-8")) + 2
        except UnicodeEncodeError:
            raise refuse(where, "a string is not valid Unicode text (a lone surrogate)") from None

    def scalar(value: Any, where: Where) -> int:
        if value is None or isinstance(value, bool):
            return 5
        if isinstance(value, int):
            if value.bit_length() > MAX_INTEGER_BITS:
                raise refuse(where, "a number with more than 300 digits")
            return len(str(value))
        if isinstance(value, float):
            if not math.isfinite(value):
                raise refuse(where, f"{value!r} is not a JSON number")
            return len(repr(value))
        raise refuse(where, f"a {type(value).__name__} value is not JSON (YAML dates, binary data and sets are not allowed)")

    def measure(value: Any, level: int, where: Where) -> int:
        if isinstance(value, str):
            return text(value, where)
        if not isinstance(value, (list, dict)):
            return scalar(value, where)
        if level > MAX_NESTING:
            raise refuse(where, f"nests deeper than {MAX_NESTING} levels")
        known = id(value)
        if known in sizes:
            if level + depths[known] > MAX_NESTING:
                raise refuse(where, f"nests deeper than {MAX_NESTING} levels")
            return sizes[known]
        total, deepest = 2, 0
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    raise refuse(where, f"a key ({type(key).__name__} {shown(key, 40)}) is not a string")
                total += text(key, where) + 1
            items: Iterable[tuple[Any, Any]] = value.items()
        else:
            items = enumerate(value)
        for key, item in items:
            total += measure(item, level + 1, (where, key)) + 1
            if isinstance(item, (list, dict)):
                deepest = max(deepest, 1 + depths[id(item)])
            if total > MAX_DEFINITION_BYTES:
                raise InvalidRoutine(
                    f"{source}: the definition is larger than {MAX_DEFINITION_BYTES} bytes (YAML aliases expanded)"
                )
        sizes[known], depths[known] = total, deepest
        return total

    return measure(data, 1, None)


def _path_text(where: tuple[Any, Any] | None) -> str:
    """A value's place as errors show it: ``steps[1].args.name`` (keys cut to 40 characters)."""
    keys = []
    while where is not None:
        where, key = where
        keys.append(key)
    out = ""
    for key in reversed(keys):
        out += f"[{key}]" if isinstance(key, int) else (f".{key[:40]}" if out else key[:40])
    return out


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


def _checked_path(raw: Path | str, what: str) -> Path:
    if not isinstance(raw, (str, Path)):
        raise InvalidRoutine(f"{what}: expected a path, got a {type(raw).__name__}")
    text = str(raw)
    if "\x00" in text:
        raise InvalidRoutine(f"{what}: the path holds a NUL character")
    if len(text) > MAX_PATH_LENGTH:
        raise InvalidRoutine(f"{what}: the path is longer than {MAX_PATH_LENGTH} characters")
    return Path(text)


def read_routine_file(path: Path) -> Any:
    """The parsed content of a YAML or JSON routine file; InvalidRoutine for anything else."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_ROUTINE_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise InvalidRoutine(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if len(raw) > MAX_ROUTINE_FILE_BYTES:
        raise InvalidRoutine(f"{path}: larger than {MAX_ROUTINE_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRoutine(f"{path}: not UTF-8 text (undecodable byte at offset {exc.start})") from None
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        return json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise InvalidRoutine(f"{path}: not valid JSON: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidRoutine(f"{path}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise InvalidRoutine(f"{path}: nests deeper than {MAX_NESTING} levels") from None
    except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the file is refused in one line
        # YAML tags whose value does not construct (2020-02-30, !!int x, !!int with no value), numbers
        # of 4300+ digits: the parsers raise ValueError, IndexError, KeyError... instead of their own errors
        reason = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
        raise InvalidRoutine(f"{path}: not valid {kind}: {reason}") from None


class _Budget:
    """What loading one routine may read, counting each use of a sub-routine file again."""

    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0

    def spend(self, source: str, size: int) -> None:
        self.files += 1
        self.bytes += size
        if self.files > MAX_ROUTINE_FILES:
            raise InvalidRoutine(f"{source}: the routine uses more than {MAX_ROUTINE_FILES} sub-routine files")
        if self.bytes > MAX_DEFINITION_BYTES:
            raise InvalidRoutine(f"{source}: the routine with its sub-routines is larger than {MAX_DEFINITION_BYTES} bytes")


def load_routine(
    path: Path | str, resolve_stored=None, _seen: tuple[Path, ...] = (), _budget: _Budget | None = None
) -> Routine:
    """Load and validate a routine file, with its sub-routines (files relative to it, or stored names).

    ``resolve_stored(name)`` returns a stored routine's definition (a dict) or None.
    """
    budget = _budget or _Budget()
    given = _checked_path(path, "routine file")
    try:
        path = given.resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise InvalidRoutine(f"{given}: cannot read ({exc})") from None
    if path in _seen:
        raise InvalidRoutine(f"{path}: sub-routines include each other in a cycle")
    data = read_routine_file(path)
    budget.spend(str(path), check_definition(data, str(path)))
    routine = _validated(data, str(path))
    return _resolve_subroutines(routine, path, resolve_stored, (*_seen, path), budget)


def _resolve_subroutines(routine: Routine, path: Path, resolve_stored, seen: tuple[Path, ...], budget: _Budget) -> Routine:
    def resolve(steps: list[Any]) -> list[Any]:
        out = []
        for step in steps:
            if isinstance(step, ParallelStep):
                step = step.model_copy(update={"parallel": [resolve(branch) for branch in step.parallel]})
            elif isinstance(step, SubRoutineStep):
                if isinstance(step.routine, str):
                    child = _load_reference(step, path, resolve_stored, seen, budget)
                else:  # inline: its own references are relative to this file
                    child = _resolve_subroutines(step.routine, path, resolve_stored, seen, budget)
                step = step.model_copy(update={"routine": child})
            out.append(step)
        return out

    return routine.model_copy(update={"steps": resolve(list(routine.steps))})


def _load_reference(step: SubRoutineStep, path: Path, resolve_stored, seen: tuple[Path, ...], budget: _Budget) -> Routine:
    reference = str(step.routine)
    where = f"{path}: step {step.id!r}"
    _checked_path(reference, where)
    try:
        candidate = (path.parent / reference).resolve()
        is_file = candidate.suffix in (".yaml", ".yml", ".json") or candidate.exists()
        exists = candidate.exists()
    except (OSError, RuntimeError, ValueError) as exc:
        raise InvalidRoutine(f"{where}: sub-routine {reference[:80]!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if is_file:
        if not exists:
            raise InvalidRoutine(f"{where}: sub-routine file {reference[:200]!r} does not exist")
        return load_routine(candidate, resolve_stored, seen, budget)
    stored = resolve_stored(reference) if resolve_stored and NAME_PATTERN.fullmatch(reference) else None
    if stored is None:
        raise InvalidRoutine(f"{where}: no file or stored routine named {reference[:200]!r}")
    source = f"stored routine {reference!r}"
    budget.spend(source, check_definition(stored, source))
    return _resolve_subroutines(_validated(stored, source), path, resolve_stored, seen, budget)


ParallelStep.model_rebuild()
SubRoutineStep.model_rebuild()
Routine.model_rebuild()
