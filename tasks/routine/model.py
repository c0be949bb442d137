"""The routine language: what a routine file may say, as pydantic models (validated before anything runs)."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from state.limits import MAX_TEXT_LENGTH, NAME_PATTERN
from state.models import ConflictResolutionStrategy, DataSensitivity, ExportDestination
from tasks.actions import check_action
from tasks.expressions import Condition

STEP_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN.pattern)]
TIMEOUT_LIMIT_S = 7 * 86400  # a step or routine time limit: up to a week
WAIT_LIMIT_S = 365 * 86400  # a wait for an outside event: up to a year
# An event's name: letters, digits and ``_ . : -``; in a routine, ``{name}`` places a variable's value.
EVENT_NAME = r"^[A-Za-z0-9_.:\-]{1,200}$"
EVENT_TEMPLATE = r"^(?:[A-Za-z0-9_.:\-]|\{[A-Za-z_][A-Za-z0-9_.\-]{0,99}\})+$"
# The numbers of the loop, retry and time-limit fields are strict: `true` is not 1 (pydantic's lax
# mode would take it as 1, and the string "5" as 5).


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


class RetrySpec(_Strict):
    """Run a step's action again when it raises: ``max_attempts`` in all (the first included), after
    ``backoff_s`` x ``backoff_rate`` ** (attempt - 1) seconds, at most ``max_backoff_s``; ``on``
    names the exception classes retried (a class or any of its bases; ``Timeout`` for a step that
    ran past its ``timeout_s``), empty: any."""

    max_attempts: int = Field(ge=1, le=100, strict=True)
    backoff_s: float = Field(default=1.0, ge=0, le=3600, strict=True)
    backoff_rate: float = Field(default=2.0, ge=1, le=10, strict=True)
    max_backoff_s: float = Field(default=300.0, ge=0, le=86400, strict=True)
    on: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,199}$")]] = Field(default_factory=list)

    def delay_s(self, attempt: int) -> float:
        """The wait before the attempt after ``attempt`` (1 for the first)."""
        return min(self.max_backoff_s, self.backoff_s * self.backoff_rate ** (attempt - 1))

    def retries(self, error_types: list[str]) -> bool:
        """Whether an error whose class (and bases) have these names is retried."""
        return not self.on or any(name in self.on for name in error_types)


def _condition(raw: Any) -> Any:
    if raw is None or isinstance(raw, Condition):
        return raw
    if not isinstance(raw, str):
        kind = {bool: "true or false", int: "a number", float: "a number", list: "a list", dict: "a mapping"}.get(type(raw))
        raise ValueError(f"an expression is a string (when: \"x > 1\"), not {kind or type(raw).__name__}")
    return Condition.parse(raw)


class _Guarded(_Strict):
    """What every step may say: ``when``, a condition on the context (false: the step is skipped)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    when: Condition | None = None

    @field_validator("when", mode="before")
    @classmethod
    def _parse_when(cls, raw: Any) -> Any:
        return _condition(raw)

    @field_serializer("when")
    def _when_source(self, when: Condition | None) -> str | None:
        return None if when is None else when.source


class _FailurePolicy(_Guarded):
    """``on_failure: continue`` lets the run go on after this step (or group) fails; ``error_into``
    names the variable that gets the masked error, its type and the step."""

    on_failure: Literal["fail", "continue"] = "fail"
    error_into: Name | None = None

    @model_validator(mode="after")
    def _error_into_needs_continue(self) -> Any:
        if self.error_into is not None and self.on_failure != "continue":
            raise ValueError("error_into needs on_failure: continue")
        return self


class ActionStep(_FailurePolicy):
    id: str = Field(pattern=STEP_ID)
    action: str
    args: dict[str, Any] = Field(default_factory=dict)
    # In an inline routine, `false` makes this step a task of its own (e.g. a slow or risky action).
    inline: bool | None = None
    # Need-to-know: the secret variables this step reads (to other steps they are absent).
    reads: list[Annotated[str, Field(pattern=NAME_PATTERN.pattern)]] = Field(default_factory=list)
    # What this step writes is as sensitive as the most sensitive value it read, except these.
    declassify: list[Annotated[str, Field(pattern=NAME_PATTERN.pattern)]] = Field(default_factory=list)
    retry: RetrySpec | None = None
    # An action still running after this long is stopped (Celery's time limits) and the step fails.
    timeout_s: float | None = Field(default=None, gt=0, le=TIMEOUT_LIMIT_S, strict=True)

    @model_validator(mode="after")
    def _known_action(self, info: ValidationInfo) -> ActionStep:
        # A stored routine was checked against the allow-list of the process that loaded it; the
        # process that runs a step checks its own when it imports the action.
        check_action(self.action, self.args, allow_list=not (info.context or {}).get("stored"))
        return self


class WaitSpec(_Strict):
    """Wait for an outside event (``runctx signal RUN EVENT``) and put its payload in ``into``: the
    run holds no worker and no message meanwhile. ``{name}`` in ``event`` is replaced by the value of
    variable ``name`` (``approve-{item}``: one event per item of a fan-out). After ``timeout_s`` the
    step fails its run (``on_timeout: fail``) or goes on with ``into`` null (``continue``)."""

    event: str
    into: Name
    timeout_s: float | None = Field(default=None, gt=0, le=WAIT_LIMIT_S, strict=True)
    on_timeout: Literal["fail", "continue"] = "fail"

    @field_validator("event")
    @classmethod
    def _event_name(cls, event: str) -> str:
        if len(event) > 200 or not re.fullmatch(EVENT_TEMPLATE, event):
            raise ValueError("an event is letters, digits, '_', '.', ':' and '-' (with {variable} placeholders), at most 200 characters")
        return event


class WaitStep(_Guarded):
    id: str = Field(pattern=STEP_ID)
    wait_for: WaitSpec


class ParallelStep(_FailurePolicy):
    id: str = Field(pattern=STEP_ID)
    parallel: list[Annotated[list[Step], Field(min_length=1)]] = Field(min_length=1)


class CollectSpec(_Strict):
    """What each item brings back: its variable ``from``, gathered in item order into ``into``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: Name = Field(alias="from")
    into: Name


# 0 to 100 percent, with at most 6 decimals ("100.5%" is over it).
_PERCENT = r"^(100(\.0{1,6})?|[1-9]?[0-9](\.[0-9]{1,6})?)%$"


class ForEachStep(_Guarded):
    """The same steps for every item of a list variable, each item in a child context of its own
    that holds the item as ``as`` (and the variables it inherits), at most ``max_concurrency`` at once."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, arbitrary_types_allowed=True)

    id: str = Field(pattern=STEP_ID)
    for_each: Name
    as_: Name = Field(default="item", alias="as")
    steps: list[Step] = Field(min_length=1)
    max_concurrency: int = Field(default=10, ge=1, le=10_000, strict=True)
    inherit: list[Name] = Field(default_factory=list)
    collect: CollectSpec | None = None
    merge: MergeSpec = Field(default_factory=MergeSpec)
    # How many items may fail (N, or N% of the items) while the group still succeeds.
    tolerate_failures: int | Annotated[str, Field(pattern=_PERCENT)] = 0
    failures_into: Name | None = None

    @field_validator("tolerate_failures", mode="before")
    @classmethod
    def _count_or_percent(cls, raw: Any) -> Any:
        """A count (an int, not a bool) or a percentage of at most 100 (checked here, so that the union's
        own errors, "tolerate_failures.int: ...", never reach the user)."""
        if isinstance(raw, int) and not isinstance(raw, bool):
            if raw < 0:
                raise ValueError("tolerate_failures cannot be negative")
            return raw
        if isinstance(raw, str) and re.fullmatch(_PERCENT, raw):
            return raw
        raise ValueError("tolerate_failures is a number of items (5) or a percentage of them, at most 100 ('10%')")

    def tolerated(self, items: int) -> int:
        """How many of ``items`` may fail (a percentage rounded down, computed exactly: 0.57% of
        10,000 is 57, where floating point would give 56)."""
        if isinstance(self.tolerate_failures, int):
            return self.tolerate_failures
        return int(items * Fraction(self.tolerate_failures[:-1]) / 100)


def _routine_kind(raw: Any) -> str:
    return "reference" if isinstance(raw, str) else "definition"


class SubRoutineStep(_Guarded):
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


_STEP_KEYS = {
    "action": "ActionStep", "parallel": "ParallelStep", "routine": "SubRoutineStep", "for_each": "ForEachStep",
    "wait_for": "WaitStep",
}

Step = Annotated[
    Annotated[ActionStep, Tag("ActionStep")]
    | Annotated[ParallelStep, Tag("ParallelStep")]
    | Annotated[SubRoutineStep, Tag("SubRoutineStep")]
    | Annotated[ForEachStep, Tag("ForEachStep")]
    | Annotated[WaitStep, Tag("WaitStep")],
    Discriminator(
        _step_kind,
        custom_error_type="step_kind",
        custom_error_message="a step needs exactly one of 'action', 'parallel', 'routine', 'for_each' or 'wait_for'",
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
    # A run still running after this long ends failed, saying so.
    timeout_s: float | None = Field(default=None, gt=0, le=TIMEOUT_LIMIT_S, strict=True)

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
    """Every step of a list, depth first, including those inside parallel groups and fan-outs (not
    sub-routines)."""
    for step in steps:
        yield step
        if isinstance(step, ParallelStep):
            for branch in step.parallel:
                yield from iter_steps(branch)
        elif isinstance(step, ForEachStep):
            yield from iter_steps(step.steps)


ParallelStep.model_rebuild()
ForEachStep.model_rebuild()
SubRoutineStep.model_rebuild()
Routine.model_rebuild()
