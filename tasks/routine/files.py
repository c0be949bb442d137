"""Loading a routine file with its sub-routines (files relative to it, or routines stored by name),
within a budget of files and bytes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from state.errors import InvalidRoutine
from state.limits import MAX_NESTING, NAME_PATTERN
from tasks.routine.bounds import MAX_DEFINITION_BYTES, MAX_ROUTINE_FILE_BYTES, check_definition
from tasks.routine.model import ForEachStep, ParallelStep, Routine, SubRoutineStep
from tasks.routine.parse import _validated

MAX_ROUTINE_FILES = 256  # files read for one routine, counting each use of a sub-routine file
MAX_PATH_LENGTH = 4096  # a routine file's path, or a sub-routine reference


def _checked_path(raw: Path | str, what: str) -> Path:
    if not isinstance(raw, (str, Path)):
        raise InvalidRoutine(f"{what}: expected a path, got a {type(raw).__name__}")
    text = str(raw)
    if "\x00" in text:
        raise InvalidRoutine(f"{what}: the path holds a NUL character")
    if len(text) > MAX_PATH_LENGTH:
        raise InvalidRoutine(f"{what}: the path is longer than {MAX_PATH_LENGTH} characters")
    return Path(text)


class RoutineYamlLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false (YAML 1.1 also reads on/off/yes/no as
    booleans, which would make a retry policy's ``on:`` key the boolean True)."""


RoutineYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RoutineYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


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
        return json.loads(text) if kind == "JSON" else yaml.load(text, Loader=RoutineYamlLoader)  # noqa: S506 - a SafeLoader
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
            elif isinstance(step, ForEachStep):
                step = step.model_copy(update={"steps": resolve(step.steps)})
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


