"""Compiled plans per routine version, kept by each process (a step finds its plan without reading
a tier: the definition L1 holds is the one the plan was compiled from)."""

from __future__ import annotations

import threading
from typing import Any

from state.store import TieredStore
from state.tiers.data import ConfigEntry
from tasks.plan import Plan, compile_plan
from tasks.routine import parse_routine

PLANS_KEPT = 256


class PlanCache:
    """Owns the compiled plans of one process. Promises: a plan is recompiled when the cached
    definition it came from is replaced; two threads never compile the same version at once."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store
        self._plans: dict[tuple[str, int], tuple[Any, Plan]] = {}
        self._compiling = threading.Lock()  # a step waits for a compile in progress (`prepare`) to end

    def get(self, name: str, version: int) -> Plan:
        cached = self._plans.get((name, version))
        if cached is not None and self.store.configs.cached_routine(name, version) is cached[0]:
            return cached[1]  # compiled from the definition this process holds: every step but a few
        with self._compiling:
            entry = self.store.configs.get_routine(name, version)
            cached = self._plans.get((name, version))
            if cached is not None and (cached[0] is entry or cached[0].data == entry.data):
                self.seed(entry, name, version, cached[1])  # read again (the L1 copy expired), unchanged
                return cached[1]
            plan = compile_plan(parse_routine(entry.data, source=f"stored routine {name}@{version}", stored=True))
            self.seed(entry, name, version, plan)
            return plan

    def compiled(self, name: str, version: int) -> Plan | None:
        """The plan of a version compiled here already, if any (no tier is read)."""
        cached = self._plans.get((name, version))
        return None if cached is None else cached[1]

    def seed(self, entry: ConfigEntry, name: str, version: int, plan: Plan) -> None:
        """Keep ``plan``, compiled from ``entry`` (as `get` would have compiled it)."""
        if len(self._plans) > PLANS_KEPT:
            self._plans.clear()
        self._plans[(name, version)] = (entry, plan)
