"""Waiting for something observable: the one way tests wait (never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float, what: str | Callable[[], str], interval_s: float = 0.02) -> T:
    """Ask ``condition`` every ``interval_s`` until it returns something truthy, and return that.

    After ``timeout_s`` raise TimeoutError naming ``what`` was awaited (a callable is asked then,
    to say the state things were left in). ``condition`` may raise to give up at once (e.g. a
    process it waits on has exited).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {said}")
        time.sleep(interval_s)

