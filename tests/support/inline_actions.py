"""User actions of the inline tests that stand for a worker killed mid-chain (referenced as
``tests.support.inline_actions:<name>``: one module, imported once, so its exception class and its record
of deaths are the ones the tests see)."""

from __future__ import annotations

from typing import Any

DIED = "the worker died"


class WorkerDied(BaseException):
    """Stands for a SIGKILL: not an Exception, so nothing in the engine or the dispatcher catches it."""


_deaths: dict[str, int] = {}


def die_once(view, args: dict[str, Any]) -> list:
    """Kill the 'worker' the first time this step runs (keyed by ``args['key']``); then append."""
    from tasks.changes import Change

    key = args["key"]
    if _deaths.get(key, 0) == 0:
        _deaths[key] = 1
        raise WorkerDied(DIED)
    return [Change.append("log", args["value"])]


def always_die(view, args: dict[str, Any]) -> list:
    raise WorkerDied(DIED)
