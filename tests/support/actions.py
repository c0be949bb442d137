"""User actions of the engine-level tests (referenced as ``tests.support.actions:<name>``).

They hold no state. Routines name them by reference, so the engine imports this module itself
(RUNCTX_ACTION_MODULES=tests allows it); the inline tests' actions, which do keep a record, are
in tests.support.inline_actions, those with an outside effect for real workers in
tests.support.fault_actions and tests.support.chaos_actions.
"""

from __future__ import annotations

from typing import Any

from tasks.changes import Change

ME = __name__  # "tests.support.actions": how routines name the actions below


def log_counter(view, args: dict[str, Any]) -> list[Change]:
    """Append the counter's current value to ``log``: shows when (and how often) a step applied."""
    return [Change.append(args.get("log", "log"), view.get(args.get("name", "counter")))]


def leak_secret(view, args: dict[str, Any]) -> None:
    """A buggy user action whose exception message quotes a secret variable."""
    raise RuntimeError(f"upstream refused token {view.get('token')}")


def as_mapping(view, args: dict[str, Any]) -> dict[str, Any]:
    """A user action returning a mapping: each entry is a `set`."""
    return {"doubled": view.get("counter", 0) * 2, "seen": True}


def deep_failure(view, args: dict[str, Any]) -> None:
    """A user's own bug, two frames deep (its traceback must show both)."""
    _deeper()


def _deeper() -> None:
    raise ValueError("the user's own bug")


# ---- need-to-know ----------------------------------------------------------------------------------


def derive(view, args: dict[str, Any]) -> dict[str, Any]:
    """Derive new values from the token (a mapping: each entry is a `set`, no sensitivity given)."""
    token = view.get("token")
    return {"derived": token.upper(), "token_length": len(token)}


def peek(view, args: dict[str, Any]) -> dict[str, Any]:
    """What a step without `reads` sees of the token."""
    return {"seen": view.get("token", "absent"), "listed": "token" in view.names(), "has": "token" in view}


# ---- resume ------------------------------------------------------------------------------------------


def divide(view, args: dict[str, Any]) -> dict[str, Any]:
    """``quotient``: ``total`` / ``divisor`` (a divisor of 0 fails the step: a bad variable)."""
    divisor = view.get("divisor")
    if not divisor:
        raise ValueError(f"divisor is {divisor!r}")
    return {"quotient": view.get("total") / divisor}
