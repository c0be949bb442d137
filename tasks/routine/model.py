"""The routine language: what a routine file may say, as pydantic models (validated before anything runs)."""

from __future__ import annotations

from typing import Annotated, Any

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

from state.limits import MAX_TEXT_LENGTH, NAME_PATTERN
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


ParallelStep.model_rebuild()
SubRoutineStep.model_rebuild()
Routine.model_rebuild()
