"""Submitting a run: its routine's definition stored (a new version only when it changed), the run
and its root context created in one L3 transaction, its first steps dispatched."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from state.errors import InvalidRoutine, InvalidValue, NotFound, RoutineError, RunExists, log_error
from state.keys import context_id
from state.limits import MAX_CONTEXT_ID_LENGTH, canonical_json, check_name, check_run_id
from state.models import ExportDeclaration, ResourceLimits, RunContext, RunContextInit
from state.store import TieredStore
from state.tiers.data import ConfigEntry, RunRow
from tasks.lifecycle import RunLifecycle
from tasks.plan import compile_plan
from tasks.plans import PlanCache
from tasks.routine import ForEachStep, ParallelStep, Routine, WaitStep, check_definition, iter_steps

log = logging.getLogger(__name__)

REGISTRATIONS_KEPT = 256
MAX_KEY_LENGTH = 200  # the runs table's column


@dataclass(frozen=True)
class Submission:
    """A submit's answer: the run, and whether it existed already (the same idempotency key)."""

    run_id: str
    existing: bool = False


def check_idempotency_key(key: str) -> str:
    if not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidValue(f"idempotency key: 1 to {MAX_KEY_LENGTH} printable characters, got {str(key)[:60]!r}")
    return key


class RunSubmitter:
    """Registers routines and submits runs. Owns a memo of the definitions it registered (a stored
    version never changes, so one registered once is not compared with L3 again). Promises: a run
    and its root context are created in one L3 transaction, after every value was checked against
    the limits, so a refused submit leaves no trace."""

    def __init__(self, store: TieredStore, plans: PlanCache, lifecycle: RunLifecycle, limits: ResourceLimits) -> None:
        self.store = store
        self.plans = plans
        self.lifecycle = lifecycle
        self.limits = limits
        # (routine name, digest of its definition) -> the version it is stored as.
        self._registered: LRUCache[tuple[str, str], int] = LRUCache(maxsize=REGISTRATIONS_KEPT)

    def register(self, routine: Routine) -> int:
        """Store the routine definition (a new version only if it changed); returns its version."""
        return self._register(routine).version

    def _register(self, routine: Routine, known: tuple[Any, str] | None = None) -> ConfigEntry:
        """The stored version of ``routine``'s definition (stored now if no version holds it),
        cached in this process's tiers under that version's key. ``known``: its `_definition`."""
        configs = self.store.configs
        definition, digest = known or self._definition(routine)
        version = self._registered.get((routine.name, digest)) if digest else None  # registered before: checked then
        if version is None:
            check_definition(definition, routine.name)
            try:
                latest = configs.get_routine(routine.name)
                version = latest.version if latest.data == definition else None
            except NotFound:
                pass
            if version is None:
                version = configs.put_routine(routine.name, definition)
            self._registered[(routine.name, digest)] = version
            configs.announce_routine(routine.name, version)  # every process may compile it now
        return configs.cache_routine(routine.name, version, definition)

    @staticmethod
    def _definition(routine: Routine) -> tuple[Any, str]:
        """The definition stored for ``routine`` and a digest of it."""
        try:
            # Defaults left out: what the user wrote is what is stored (and measured against the
            # size limit), so a routine file within the limit is never refused for runctx's defaults.
            definition = routine.model_dump(mode="json", exclude_defaults=True, by_alias=True)
        except (ValueError, TypeError) as exc:  # e.g. bytes that are not UTF-8, from a Routine built in Python
            raise InvalidRoutine(f"{routine.name}: the definition is not JSON ({type(exc).__name__})") from None
        try:
            digest = hashlib.blake2b(canonical_json(definition).encode(), digest_size=16).hexdigest()
        except (ValueError, TypeError, RecursionError, UnicodeEncodeError):
            digest = ""  # not JSON: check_definition says why
        return definition, digest

    def submit(
        self, routine: Routine, *, variables: dict[str, Any] | None = None, run_id: str | None = None, source: str | None = None,
        idempotency_key: str | None = None,
    ) -> Submission:
        """Create the run and its root context in one L3 transaction, then dispatch its first steps.

        ``source``: where the routine came from (a file), named in messages. ``idempotency_key``:
        if a run kept holds it from a submit of the same routine and variables, that run is the
        answer (nothing is created); of another routine or other variables, InvalidValue.
        """
        run_id = check_run_id(run_id) if run_id is not None else uuid.uuid4().hex
        root = self._root_context(routine, run_id, variables, source)
        self._check_items(routine, root, source)
        known = self._definition(routine)
        digest = None
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
            digest = self.store.codec.checksum(canonical_json([routine.name, known[1], variables or {}]).encode())
            holder = self.store.ledger.run_by_key(idempotency_key)
            if holder is not None:  # before anything is stored: a misuse changes nothing
                return self._existing(idempotency_key, holder.run_id, holder.request_digest, digest)
        version = self._registered.get((routine.name, known[1]))
        plan = (self.plans.compiled(routine.name, version) if version is not None else None) or compile_plan(routine)
        for path in plan.contexts:  # sub-routine contexts are named by their step path
            if len(context_id(run_id, path)) > MAX_CONTEXT_ID_LENGTH:
                raise InvalidRoutine(
                    f"{routine.name}: sub-routine {path[:80]!r}...: its context id would be longer than "
                    f"{MAX_CONTEXT_ID_LENGTH} characters (shorter step ids, or less nesting)"
                )
        entry = self._register(routine, known)
        version = entry.version
        root.routine_id = f"{routine.name}@{version}"
        self.plans.seed(entry, routine.name, version, plan)  # compiled from what is stored as that version
        run = RunRow(
            run_id=run_id, routine_name=routine.name, routine_version=version, root_context_id=run_id, status="running",
            idempotency_key=idempotency_key, request_digest=digest,
        )
        try:
            root = self.store.create_context(root, run=run)
        except RunExists as exc:  # another submit with the key created its run meanwhile
            return self._existing(exc.key, exc.run_id, exc.request_digest, digest)
        self.store.ledger.count_l3_write(run_id)
        self.store.configs.announce_routine(routine.name, version)  # for processes that started since it was stored
        try:
            self.lifecycle.dispatch(plan, run_id, routine.name, version, plan.start, {"": root.version}, {"": root}, root.epoch)
        except RoutineError as exc:  # e.g. a first sub-routine that cannot inherit what it asks for
            log_error(log, exc, f"run {run_id} failed before its first step")
            self.lifecycle.fail(run_id, routine.name, version, {"": root.version}, str(exc))
        return Submission(run_id, existing=False)

    @staticmethod
    def _existing(key: str, run_id: str, held_digest: str | None, digest: str | None) -> Submission:
        if held_digest != digest:
            raise InvalidValue(
                f"idempotency key {key!r}: run {run_id} was submitted with it for another routine or other variables"
            )
        return Submission(run_id, existing=True)

    def _check_items(self, routine: Routine, root: RunContext, source: str | None) -> None:
        """A fan-out of the run's first context over a list given at submit: at most
        ``max_items`` items, refused here rather than when the run gets there."""
        max_items = self.lifecycle.max_items
        for step in _in_root_context(routine.steps):
            listed = root.variables.get(step.for_each)
            if isinstance(listed, list) and len(listed) > max_items:
                where = f"{source} (routine {routine.name!r})" if source else f"routine {routine.name!r}"
                raise InvalidValue(
                    f"{where}: variables.{step.for_each}: {len(listed)} items for fan-out {step.id!r}, more than "
                    f"the {max_items} allowed (RUNCTX_MAX_ITEMS)"
                )

    def _root_context(self, routine: Routine, run_id: str, variables: Any, source: str | None) -> RunContext:
        """The run's root context, every value checked against the limits (nothing is stored yet)."""
        if variables is not None and not isinstance(variables, Mapping):
            raise InvalidValue(f"variables: expected a mapping of names to values, got a {type(variables).__name__}")
        for name in variables or {}:
            check_name(name)
        specs = routine.initial_variables()
        values = {name: spec.value for name, spec in specs.items() if not spec.required}
        # A variable a wait step fills is declared without a value: its signal gives it one.
        signalled = {step.wait_for.into for step in iter_steps(routine.steps) if isinstance(step, WaitStep)}
        for name, spec in specs.items():
            if spec.required and name not in (variables or {}) and name not in signalled:
                where = f"{source} (routine {routine.name!r})" if source else f"routine {routine.name!r}"
                raise InvalidValue(
                    f"{where}: variables.{name}: declared {spec.sensitivity.value} without a value: give it at "
                    "submit (runctx run --var-file FILE, or variables= in the API)"
                )
        unknown = set(variables or {}) - set(specs)
        if unknown:
            log.info("run %s: variables given that the routine does not declare: %s", run_id, sorted(unknown))
        values.update(variables or {})
        return RunContext.from_init(
            RunContextInit(
                run_id=run_id,
                routine_id=routine.name,
                variables=values,
                sensitivity_map={name: spec.sensitivity for name, spec in specs.items()},
                exports=[ExportDeclaration(**spec.model_dump()) for spec in routine.exports],
                limits=self.limits,
            )
        )


def _in_root_context(steps: list[Any]) -> Iterator[ForEachStep]:
    """The fan-outs whose list is in the run's first context (not in a sub-routine's or an item's)."""
    for step in steps:
        if isinstance(step, ForEachStep):
            yield step
        elif isinstance(step, ParallelStep):
            for branch in step.parallel:
                yield from _in_root_context(branch)
