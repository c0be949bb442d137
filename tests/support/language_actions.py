"""User actions of the routine-language tests on real workers (``tests.support.language_actions:<name>``):
an item's result, an item that fails, an action that fails until its Nth attempt (counting in a file
the test names: the workers run on this machine), and one that sleeps."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

ME = __name__


def square(view, args: dict[str, Any]) -> dict[str, Any]:
    """``out``: the item squared, after ``nap_s`` (so that items overlap in time)."""
    time.sleep(args.get("nap_s", 0))
    item = view.get(args.get("item", "item"))
    return {"out": item * item}


def fail_some(view, args: dict[str, Any]) -> dict[str, Any]:
    """Fails for the items listed in ``bad``; else ``out`` is the item."""
    item = view.get("item")
    if item in args["bad"]:
        raise ValueError(f"item {item} is bad")
    return {"out": item}


def flaky(view, args: dict[str, Any]) -> dict[str, Any]:
    """Raises ConnectionError until its ``succeed_on``-th call (counted in the file ``counter``)."""
    counter = Path(args["counter"])
    calls = int(counter.read_text() or "0") + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls < args["succeed_on"]:
        raise ConnectionError(f"call {calls} of a flaky service failed")
    return {"calls": calls}


def nap(view, args: dict[str, Any]) -> dict[str, Any]:
    time.sleep(args["s"])
    return {"napped": args["s"]}
