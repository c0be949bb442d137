"""A clock a test moves by hand, for code that takes one (``clock=``): time passes without sleeping."""

from __future__ import annotations

import time


class FakeClock:
    """Starts at the real time now; `advance` moves it on."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
