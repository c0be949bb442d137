"""`runctx run`, `submit` and `wait`: start runs and wait for their outcome."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

from runctx.cli.base import (
    EXIT_FAILED,
    JSON_OPTION,
    VAR_FILE_OPTION,
    VAR_OPTION,
    app,
    client,
    echo_json,
    fail,
    variables_of,
)
from runctx.embedded import embedded_released, resolve
from state.errors import RunctxError, RunTimeout
from state.settings import get_settings

PROGRESS_POLL_S = 0.25
KEY_OPTION = typer.Option(
    None, "--idempotency-key", metavar="KEY",
    help="Submit once: a second submit with KEY gives the first run (while it is kept), refused if it asks for something else.",
)


def warn_sensitive_on_command_line(routine: Any, pairs: list[str]) -> None:
    """A sensitive value given with --var is visible to anyone who can list processes."""
    specs = routine.initial_variables()
    for name in dict.fromkeys(pair.partition("=")[0] for pair in pairs):
        spec = specs.get(name)
        if spec is not None and spec.sensitivity.masked:
            typer.echo(
                f"runctx: warning: --var {name}: a {spec.sensitivity.value} value on the command line is visible in "
                "the process list; use --var-file",
                err=True,
            )


def print_result(result: Any, as_json: bool, *, existing: bool | None = None) -> None:
    """A finished run's outcome; a run that did not succeed ends the command with exit 1.
    ``existing``: `run` says whether the run existed already (an idempotency key's)."""
    if as_json:
        echo_json(result.as_json() if existing is None else {**result.as_json(), "existing": existing})
    else:
        typer.echo(f"run {result.run_id}: {result.status}")
        for step in result.steps:
            typer.echo(
                f"  {step['id']:<30} {step['status']:<10} {step['worker']:<28} "
                f"attempts={step['attempts']} {step['duration_s'] * 1000:.1f} ms"
            )
        typer.echo("variables:")
        for name, value in sorted(result.variables.items()):
            typer.echo(f"  {name} = {json.dumps(value)}")
        typer.echo(f"L3 writes: {result.l3_writes}")
    if result.status != "succeeded":
        fail(f"run {result.run_id} {result.status}: {result.error}", EXIT_FAILED)


@app.command()
def run(
    file: Path = typer.Argument(..., metavar="FILE", help="A routine file (YAML or JSON)."),
    var: list[str] = VAR_OPTION,
    var_file: Path | None = VAR_FILE_OPTION,
    workers: int = typer.Option(0, "--workers", min=0, metavar="N", help="Start N local worker nodes for this run, stopped after it."),
    key: str | None = KEY_OPTION,
    as_json: bool = JSON_OPTION,
    timeout: float | None = typer.Option(None, "--timeout", min=0, metavar="SECONDS", help="Give up waiting after this many seconds in all (exit 1; the run goes on)."),
) -> None:
    """Submit a routine, wait for it and print its outcome.

    Exits 0 only if the run succeeded. While it waits it shows a progress bar on a terminal, or a
    line on stderr each time the totals change."""
    deadline = None if timeout is None else since_start(timeout)
    from runctx.api import Client
    from runctx.local_workers import LocalWorkers

    settings = get_settings()
    variables = variables_of(var, var_file)
    with embedded_released():
        try:
            servers = resolve(settings)
            client_ = Client()
            routine = client_.load(file)
            warn_sensitive_on_command_line(routine, var)
            with LocalWorkers(workers, servers, settings) if workers else contextlib.nullcontext():
                submitted = client_.submit_request(routine, variables=variables, source=str(file), idempotency_key=key)
                run_id = submitted.run_id
                if submitted.existing and not as_json:
                    typer.echo(f"runctx: run {run_id} was submitted with this idempotency key already: waiting for it", err=True)
                if not workers and not client_.workers_alive():
                    typer.echo(f"runctx: run {run_id} waits for a worker: start some (runctx worker) or pass --workers N", err=True)
                if not as_json:
                    show_progress(client_, run_id, deadline)
                result = client_.wait(run_id, _left(deadline))
        except RunTimeout:
            fail(f"run {run_id} still running after {timeout:g} s (it goes on: runctx wait {run_id})")
        except RunctxError as exc:
            fail(str(exc))
    print_result(result, as_json, existing=submitted.existing)


def since_start(seconds: float) -> float:
    """The monotonic time ``seconds`` after this process started: a command's whole wait counts its
    own start-up (imports, connecting) too."""
    import psutil

    started = psutil.Process().create_time()
    return time.monotonic() + max(0.0, started + seconds - time.time())


def _left(deadline: float | None) -> float | None:
    """What is left of the command's whole wait (one deadline for the progress display and the wait)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def show_progress(client_: Any, run_id: str, deadline: float | None) -> None:
    """Until the run ends (or the deadline): a live bar on a terminal, else a line per change on stderr."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("running {task.fields[running]}  failed {task.fields[failed]}"), TimeElapsedColumn(),
        )
        with Progress(*columns, console=Console(file=sys.stdout), refresh_per_second=8) as bar:
            task = bar.add_task(f"run {run_id}", total=None, running=0, failed=0)
            for states in states_until_end(client_, run_id, deadline):
                totals = states["totals"]
                bar.update(task, total=totals["total"], completed=totals["done"], running=totals["running"], failed=totals["failed"])
        return
    last = None
    for states in states_until_end(client_, run_id, deadline):
        line = f"run {run_id}: {totals_line(states)}"
        if line != last:
            typer.echo(line, err=True)
            last = line


def states_until_end(client_: Any, run_id: str, deadline: float | None, poll_s: float = PROGRESS_POLL_S) -> Any:
    """The run's step states every ``poll_s``, the last one once it has ended (or at the deadline)."""
    while True:
        states = client_.step_states(run_id)
        yield states
        if states["status"] not in ("running", "waiting") or (deadline is not None and time.monotonic() >= deadline):
            return
        time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))


def totals_line(states: dict[str, Any]) -> str:
    totals = states["totals"]
    parts = [f"done {totals['done']}", f"running {totals['running']}", f"pending {totals['pending']}", f"failed {totals['failed']}"]
    for state in ("waiting", "skipped", "cancelled"):
        if totals.get(state):
            parts.append(f"{state} {totals[state]}")
    return " / ".join(parts) + f" (of {totals['total']})"


@app.command()
def submit(
    file: Path = typer.Argument(..., metavar="FILE", help="A routine file (YAML or JSON)."),
    var: list[str] = VAR_OPTION,
    var_file: Path | None = VAR_FILE_OPTION,
    key: str | None = KEY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Submit a routine and print its run id, without waiting.

    With --idempotency-key, a second submit with the key prints the first run's id (exit 0) while
    that run is kept; --json then says "existing": true."""
    variables = variables_of(var, var_file)
    with client() as client_:
        routine = client_.load(Path(file))
        warn_sensitive_on_command_line(routine, var)
        submitted = client_.submit_request(routine, variables=variables, source=str(file), idempotency_key=key)
    if as_json:
        echo_json({"run_id": submitted.run_id, "existing": submitted.existing})
    else:
        typer.echo(submitted.run_id)


@app.command()
def wait(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run to wait for."),
    as_json: bool = JSON_OPTION,
    timeout: float | None = typer.Option(None, "--timeout", min=0, metavar="SECONDS", help="Give up waiting after this many seconds (exit 1; the run goes on)."),
) -> None:
    """Wait for a run and print its outcome.

    Any run, submitted by any process, as often as you like; exits 0 only if it succeeded."""
    deadline = None if timeout is None else since_start(timeout)
    with client() as client_:
        try:
            result = client_.wait(run_id, _left(deadline))
        except RunTimeout:
            fail(f"run {run_id} still running after {timeout:g} s (it goes on)")
    print_result(result, as_json)
