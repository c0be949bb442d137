"""Step actions: the built-ins and user callables (``package.module:function``).

An action gets a read view of the context and the step's args and returns the changes it
makes: a list of Change, a mapping of name -> value (each a `set`), or None.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from state.errors import NodeMisconfigured, StepFailed
from state.settings import get_settings
from tasks.changes import Change, ContextView

Action = Callable[[ContextView, dict[str, Any]], "list[Change] | Mapping[str, Any] | None"]


class _Args(BaseModel):
    # Frozen: one validated instance serves every step with the same args (`builtin_args`).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class SetArgs(_Args):
    name: str
    value: Any = None


class IncrementArgs(_Args):
    name: str
    by: int | float = 1


class AppendArgs(_Args):
    name: str
    value: Any = None


class CopyArgs(_Args):
    source: str = Field(alias="from")
    to: str


class SleepArgs(_Args):
    seconds: float = Field(ge=0, le=3600)


class FailArgs(_Args):
    message: str = "the routine asked to fail"


def _set(view: ContextView, args: SetArgs) -> list[Change]:
    return [Change.set(args.name, args.value)]


def _increment(view: ContextView, args: IncrementArgs) -> list[Change]:
    return [Change.increment(args.name, args.by)]


def _append(view: ContextView, args: AppendArgs) -> list[Change]:
    return [Change.append(args.name, args.value)]


def _copy(view: ContextView, args: CopyArgs) -> list[Change]:
    if args.source not in view:
        raise StepFailed(f"copy: variable {args.source!r} does not exist")
    # A copy is as sensitive as its source: a copied secret stays masked.
    return [Change.set(args.to, view.get(args.source), sensitivity=view.sensitivity_of(args.source))]


def _sleep(view: ContextView, args: SleepArgs) -> list[Change]:
    time.sleep(args.seconds)
    return []


def _fail(view: ContextView, args: FailArgs) -> list[Change]:
    raise StepFailed(args.message)


BUILTINS: dict[str, tuple[type[_Args], Callable[[ContextView, Any], list[Change]]]] = {
    "set": (SetArgs, _set),
    "increment": (IncrementArgs, _increment),
    "append": (AppendArgs, _append),
    "copy": (CopyArgs, _copy),
    "sleep": (SleepArgs, _sleep),
    "fail": (FailArgs, _fail),
}


def check_action(action: str, args: dict[str, Any], *, allow_list: bool = True) -> None:
    """Raise ValueError naming the problem if a built-in's args are wrong or a reference is malformed
    (or, with ``allow_list``, names a module RUNCTX_ACTION_MODULES does not allow here)."""
    if action in BUILTINS:
        try:
            builtin_args(action, args)
        except ValidationError as exc:
            first = exc.errors()[0]
            # Drop the type names pydantic adds for a union (args.by.int -> args.by).
            where = ".".join(str(part) for part in first["loc"] if part not in ("int", "float", "str")) or "args"
            raise ValueError(f"action {action!r}: args.{where}: {first['msg']}") from None
    elif ":" not in action:
        raise ValueError(
            f"unknown action {action!r}: use a built-in ({', '.join(sorted(BUILTINS))}) or package.module:function"
        )
    elif allow_list:
        refusal = _not_allowed(action)
        if refusal:
            raise ValueError(refusal)


def _not_allowed(reference: str, *, here: str = "") -> str | None:
    """Why a user action may not be used (its module is not in RUNCTX_ACTION_MODULES), or None."""
    module = reference.partition(":")[0]
    allowed = get_settings().allowed_action_modules()
    if any(module == prefix or module.startswith(prefix + ".") for prefix in allowed):
        return None
    listed = ", ".join(allowed) if allowed else "none: only built-ins"
    return f"action {reference!r}: module {module!r} is not in RUNCTX_ACTION_MODULES{here} (allowed: {listed})"


@lru_cache(maxsize=256)
def _import(reference: str) -> Action:
    """The function a user action names. Checked against this process's RUNCTX_ACTION_MODULES (the
    client checked its own when it loaded the routine; a worker may be set up differently): a
    module this process may not or cannot import is its configuration's fault, said as such."""
    refusal = _not_allowed(reference, here=" on this node")
    if refusal:
        raise NodeMisconfigured("RUNCTX_ACTION_MODULES", refusal)
    module_name, _, attribute = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NodeMisconfigured(
            "RUNCTX_ACTION_MODULES",
            f"action {reference!r}: module {module_name!r} cannot be imported on this node "
            f"({type(exc).__name__}: {exc}; install it where the workers run, or set their PYTHONPATH)",
        ) from None
    try:
        target = getattr(module, attribute)
    except AttributeError:
        raise StepFailed(f"action {reference!r} cannot be imported: module {module_name!r} has no {attribute!r}") from None
    if not callable(target):
        raise StepFailed(f"action {reference!r} is not callable")
    return target


def builtin_args(action: str, args: dict[str, Any]) -> _Args | None:
    """A built-in action's args, validated (once, when a plan is compiled: the same args of many
    steps once for all); None for a user action. Raises ValidationError for wrong args."""
    if action not in BUILTINS:
        return None
    try:
        return _validated_args(action, tuple(sorted(args.items())))
    except TypeError:  # a value that is a list or mapping (unhashable): validated each time
        return BUILTINS[action][0].model_validate(args)


@lru_cache(maxsize=4096)
def _validated_args(action: str, args: tuple[tuple[str, Any], ...]) -> _Args:
    return BUILTINS[action][0].model_validate(dict(args))


def run_action(action: str, view: ContextView, args: dict[str, Any], validated: _Args | None = None) -> list[Change]:
    """Run an action and return its changes as a list of Change (``validated``: a built-in's args
    as `builtin_args` gave them)."""
    if action in BUILTINS:
        model, function = BUILTINS[action]
        return function(view, validated if validated is not None else model.model_validate(args))
    result = _import(action)(view, dict(args))
    if result is None:
        return []
    if isinstance(result, Mapping):
        return [Change.set(name, value) for name, value in result.items()]
    wrong = StepFailed(f"action {action!r} must return a list of Change, a mapping or None, not a {type(result).__name__}")
    if isinstance(result, (str, bytes)):
        raise wrong
    try:
        changes = list(result)
    except TypeError:  # not iterable: a number, an object
        raise wrong from None
    bad = next((change for change in changes if not isinstance(change, Change)), None)
    if bad is not None:
        raise StepFailed(f"action {action!r} must return a list of Change, a mapping or None, not a list holding a {type(bad).__name__}")
    return changes
