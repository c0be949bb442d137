"""The Python API: submit a routine, wait for its outcome, read its final context.

    from runctx.api import Client
    client = Client()
    run_id = client.submit("examples/onboarding.yaml", variables={"greeting": "hi"})
    result = client.wait(run_id)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runctx import read_models
from runctx.embedded import resolve
from runctx.history_views import HistoryReader
from state.errors import (
    CommunicationFailure,
    InvalidRoutine,
    InvalidValue,
    NotFound,
    RunTimeout,
)
from state.migrate import upgrade
from state.models import RunContext
from state.settings import get_settings
from state.tiers.data import FINAL_STATUSES, RunRow, SignalReceipt
from tasks.routine import Routine, check_definition, load_routine, parse_routine
from tasks.submission import Submission

__all__ = ["Client", "RunResult", "RunTimeout"]


@dataclass
class RunResult:
    run_id: str
    status: str  # running | succeeded | failed
    error: str | None
    variables: dict[str, Any]  # confidential and secret values masked
    steps: list[dict[str, Any]] = field(default_factory=list)
    l3_writes: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "error": self.error,
            "variables": self.variables,
            "steps": self.steps,
            "l3_writes": self.l3_writes,
        }


MAX_VAR_FILE_BYTES = 1 << 20


def load_var_file(path: Path | str) -> dict[str, Any]:
    """Variables from a YAML or JSON file holding one mapping of names to values."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_VAR_FILE_BYTES:
            raise InvalidValue(f"{path}: a variables file is at most {MAX_VAR_FILE_BYTES} bytes")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidValue(f"{path}: cannot read the variables file ({exc.strerror or exc})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidValue(f"{path}: not YAML or JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(name, str) for name in data):
        raise InvalidValue(f"{path}: expected a mapping of variable names to values")
    check_definition(data, str(path))
    return data


class Client:
    """Submits runs through the Celery app configured by ``celeryconfig`` (RUNCTX_* settings).

    Creating one resolves the servers (starting or joining the embedded stack if none is
    configured) and brings the L3 schema up to date.
    """

    def __init__(self) -> None:
        from workers import app  # the Celery app the dispatcher sends through
        from workers.node_checks import check_broker
        from workers.runtime import runtime

        servers = resolve()
        if servers.embedded:  # its URLs carry the passwords the embedded stack made when it started
            app.conf.broker_url = servers.broker_url
        check_broker(servers)
        upgrade(servers.database_url)
        self.runtime = runtime(app)
        self.store = self.runtime.store
        self.store.maintenance.check_keys(get_settings().keyring())
        self.engine = self.runtime.engine
        self.histories = HistoryReader(self.store)

    def workers_alive(self, timeout_s: float = 1.0) -> bool:
        from workers import app

        return bool(app.control.ping(timeout=timeout_s))

    def load(self, routine: Routine | Mapping[str, Any] | Path | str) -> Routine:
        """A routine: as given, from a definition (a mapping), or from a YAML or JSON file."""
        if isinstance(routine, Routine):
            return routine
        if isinstance(routine, Mapping):
            return parse_routine(dict(routine), source="<definition>")
        if not isinstance(routine, (str, Path)):
            raise InvalidRoutine(f"routine: expected a Routine, a mapping or a file path, got a {type(routine).__name__}")
        return load_routine(routine, resolve_stored=self._stored_definition)

    def _stored_definition(self, name: str) -> Any:
        try:
            return self.store.configs.get_routine(name).data
        except NotFound:
            return None

    def submit(self, routine: Routine | Path | str, **options: Any) -> str:
        """Start a run and return its id; ``options`` are `submit_request`'s."""
        return self.submit_request(routine, **options).run_id

    def submit_request(
        self,
        routine: Routine | Path | str,
        *,
        variables: dict[str, Any] | None = None,
        var_file: Path | str | None = None,
        run_id: str | None = None,
        source: str | None = None,
        idempotency_key: str | None = None,
    ) -> Submission:
        """Start a run; ``var_file`` (YAML or JSON mapping) gives variables too, ``variables`` over it.
        ``source``: where the routine came from, for messages (a path given is its own source).
        ``idempotency_key``: a second submit with the key is answered with the first run
        (``existing``), while that run is kept, unless it asks for another routine or other
        variables (InvalidValue)."""
        given = {**(load_var_file(var_file) if var_file is not None else {}), **(variables or {})}
        if source is None and isinstance(routine, (str, Path)):
            source = str(routine)
        return self.engine.submit_request(self.load(routine), variables=given, run_id=run_id, source=source, idempotency_key=idempotency_key)

    def run_status(self, run_id: str) -> str:
        """The run's status in the ledger: running, succeeded, failed or cancelled."""
        return self._row(run_id).status

    def rotate_keys(self, *, batch: int = 100) -> tuple[str, dict[str, int]]:
        """Seal every stored value again under the newest key (see ``runctx keys rotate``): the key, and
        how many L3 rows and L2 entries were sealed again."""
        keyring = get_settings().keyring()
        return keyring.newest, self.store.maintenance.rotate_keys(keyring, batch=batch)

    def status(self, run_id: str) -> RunResult:
        return self._result(self._row(run_id))

    def _row(self, run_id: str) -> RunRow:
        row = self.store.ledger.get_run(run_id)
        if row is None:
            raise NotFound(f"run {run_id!r} does not exist")
        return row

    def _result(self, row: RunRow) -> RunResult:
        run_id = row.run_id
        context = self.context(run_id)
        if row.status in FINAL_STATUSES:
            steps, l3_writes = row.meta.get("steps", []), row.meta.get("l3_writes", 0)
        else:
            try:
                summary = self.store.ledger.summary(run_id)
            except CommunicationFailure:  # Redis is away: the ledger alone answers
                summary = {"steps": [], "l3_writes": 0}
            steps, l3_writes = summary["steps"], summary["l3_writes"]
        return RunResult(
            run_id=run_id,
            status=row.status,
            error=row.error,
            variables=context.masked_variables(),
            steps=steps,
            l3_writes=l3_writes,
        )

    def wait(self, run_id: str, timeout: float | None = None) -> RunResult:
        """Block until the run has finished (it goes on without us; waiting again is fine)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        status = "unknown"
        while True:
            try:
                row = self._row(run_id)
                status = row.status
                if row.status in FINAL_STATUSES:
                    return self._result(row)
            except CommunicationFailure:
                pass  # PostgreSQL is away (a restart): keep asking until the deadline
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise RunTimeout(f"run {run_id} still {status} after {timeout} s")
            try:
                self.store.ledger.wait_done(run_id, min(1.0, left))  # a wake-up; the ledger has the truth
            except CommunicationFailure:
                time.sleep(min(1.0, max(left, 0.01)))  # Redis is away: ask the ledger again soon

    def context_tree(self, run_id: str) -> dict[str, Any]:
        """The ``runctx context --json`` object: the run's contexts with their versions in L2 and L3."""
        return read_models.context_tree(self.store, self.engine.plans, run_id)

    def step_states(self, run_id: str) -> dict[str, Any]:
        """The ``runctx status --json`` object: each step's state, worker, attempts, duration; totals."""
        return read_models.step_states(self.store, self.engine.plans, run_id)

    def history(self, run_id: str, *, context: str | None = None, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """The ``runctx history --json`` object: each step of the run with what it changed (masked)."""
        return self.histories.history(run_id, context=context, offset=offset, limit=limit)

    def context_at(self, run_id: str, step_id: str) -> dict[str, Any]:
        """The ``runctx context --at --json`` object: the context just after ``step_id``, from the history."""
        return self.histories.context_at(run_id, step_id)

    def step_detail(self, run_id: str, step_id: str) -> dict[str, Any]:
        """A step's history entries (attempts, retries, its end) and what it changed, before -> after."""
        return self.histories.step_detail(run_id, step_id)

    def diff(self, run_id: str, step_a: str, step_b: str) -> dict[str, Any]:
        """The ``runctx diff --json`` object: what changed from just after ``step_a`` to just after ``step_b``."""
        return self.histories.difference(run_id, step_a, step_b)

    def resume(self, run_id: str, *, variables: dict[str, Any] | None = None, var_file: Path | str | None = None) -> bool:
        """Go on with a failed or cancelled run where it stopped, in a new epoch: applied steps stay
        applied, the failed one runs again, with ``variables`` (over ``var_file``'s) set first.
        False if it is running; InvalidValue if it succeeded."""
        given = {**(load_var_file(var_file) if var_file is not None else {}), **(variables or {})}
        return self.engine.resume(run_id, given)

    def fork(
        self, run_id: str, from_step: str, *, variables: dict[str, Any] | None = None, var_file: Path | str | None = None
    ) -> str:
        """A new run (its id returned) of ``run_id``'s routine version whose contexts are the origin's
        as they were just before ``from_step`` was applied, going on from there with ``variables``
        (over ``var_file``'s) set in its root first."""
        given = {**(load_var_file(var_file) if var_file is not None else {}), **(variables or {})}
        return self.engine.fork(run_id, from_step, given)

    def signal(
        self, run_id: str, event: str, payload: Any = None, *, var_file: Path | str | None = None
    ) -> SignalReceipt:
        """Send ``event`` to a run: the step waiting for it puts ``payload`` (or ``var_file``'s mapping)
        in its variable and the run goes on; a signal sent before the step waits is kept for it.
        Refused (nothing stored): an unknown run or event (NotFound, InvalidValue), a run that ended
        (RunEnded), an event sent already or whose wait timed out (SignalRefused)."""
        if var_file is not None:
            if payload is not None and not isinstance(payload, Mapping):
                raise InvalidValue("payload: with a var_file, a mapping of names to values (or none)")
            payload = {**load_var_file(var_file), **(payload or {})}
        return self.engine.signal(run_id, event, payload)

    def cancel(self, run_id: str) -> bool:
        """Cancel a running run (no further step starts; it ends ``cancelled``); False if it had ended."""
        return self.engine.cancel(run_id)

    def prune(self, older_than_s: float) -> dict[str, int]:
        """Delete finished runs older than ``older_than_s`` (see ``runctx prune``); what was deleted."""
        report = self.store.maintenance.prune(older_than_s)
        return {"runs": report.runs, "contexts": report.contexts}

    def runs(self, *, status: str | None = None, routine: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Runs, newest first, as the ``runctx runs --json`` objects; a running run that waits for an
        event is ``waiting`` (with ``waiting_for``, its events)."""
        rows = self.store.ledger.list_runs(status="running" if status == "waiting" else status, routine=routine, limit=limit)
        waiting: dict[str, list[str]] = {}
        for wait in self.store.waits.open([row.run_id for row in rows if row.status == "running"]):
            waiting.setdefault(wait.run_id, []).append(wait.event)
        if status is not None:
            rows = [row for row in rows if (row.run_id in waiting) == (status == "waiting")]
        return [
            {
                "run_id": row.run_id,
                "routine": row.routine_name,
                "version": row.routine_version,
                "status": "waiting" if row.run_id in waiting else row.status,
                "waiting_for": sorted(waiting.get(row.run_id, [])),
                "created_at": row.created_at.isoformat() if row.created_at else None,
                "finished_at": row.finished_at.isoformat() if row.finished_at else None,
                "steps": row.meta.get("step_count", len(row.meta.get("steps", []))),
                "error": row.error,
                "forked_from": row.meta.get("forked_from"),
            }
            for row in rows
        ]

    def context(self, run_id: str) -> RunContext:
        """The run's root context: the newest version (this process's L1 copy may be older)."""
        try:
            return self.store.read_newest(run_id)
        except CommunicationFailure:  # Redis is away: what L3 holds
            ctx = self.store.read_l3(run_id)
            if ctx is None:
                raise NotFound(f"context {run_id!r} is in no tier") from None
            return ctx

    def run(
        self,
        routine: Routine | Path | str,
        *,
        variables: dict[str, Any] | None = None,
        var_file: Path | str | None = None,
        timeout: float | None = None,
    ) -> RunResult:
        return self.wait(self.submit(routine, variables=variables, var_file=var_file), timeout)
