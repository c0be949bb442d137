"""`runctx cancel`, `resume`, `fork`, `signal` and `prune`: operations on runs."""

from __future__ import annotations

import re

import typer

from pathlib import Path

from runctx.cli.base import (
    EXIT_NOTHING_TO_DO,
    JSON_OPTION,
    VAR_FILE_OPTION,
    VAR_OPTION,
    app,
    client,
    echo_json,
    fail,
    usage_error,
    variables_of,
)
from state.errors import SignalRefused


@app.command()
def cancel(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run to cancel."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Cancel a running run.

    No further step starts (one running now commits nothing) and the run ends cancelled; exit 3 if
    it had ended already."""
    with client() as client_:
        cancelled = client_.cancel(run_id)
        status = "cancelled" if cancelled else client_.run_status(run_id)
    if as_json:
        echo_json({"run_id": run_id, "cancelled": cancelled, "status": status})
    elif cancelled:
        typer.echo(f"run {run_id}: cancelled")
    else:
        typer.echo(f"runctx: run {run_id} had ended ({status}): nothing to cancel", err=True)
    if not cancelled:
        raise typer.Exit(EXIT_NOTHING_TO_DO)


@app.command()
def resume(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The failed or cancelled run to go on with."),
    var: list[str] = VAR_OPTION,
    var_file: Path | None = VAR_FILE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Go on with a failed or cancelled run where it stopped.

    In a new epoch: every step applied stays applied and does not run again; the failed step (and
    what follows) runs, with the variables given set first (in the run's history, as an edit).
    Exit 1 for a run that succeeded, 3 for a run that is running."""
    variables = variables_of(var, var_file)
    with client() as client_:
        resumed = client_.resume(run_id, variables=variables)
        status = client_.run_status(run_id)
    if as_json:
        echo_json({"run_id": run_id, "resumed": resumed, "status": status})
    elif resumed:
        typer.echo(f"run {run_id}: resumed")
    else:
        typer.echo(f"runctx: run {run_id} is {status}: nothing to resume", err=True)
    if not resumed:
        raise typer.Exit(EXIT_NOTHING_TO_DO)


@app.command()
def fork(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run to fork."),
    from_step: str = typer.Option(..., "--from", metavar="STEP_ID", help="The step the new run starts with (it runs again)."),
    var: list[str] = VAR_OPTION,
    var_file: Path | None = VAR_FILE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Start a new run from a run as it was just before one of its steps.

    Its contexts are the origin's just before STEP_ID was applied (rebuilt from the origin's
    history, nothing runs twice there), with the variables given set first; it goes on from
    STEP_ID with the same routine version. The origin is left as it is. Prints the new run's id."""
    variables = variables_of(var, var_file)
    with client() as client_:
        new_id = client_.fork(run_id, from_step, variables=variables)
    if as_json:
        echo_json({"run_id": new_id, "forked_from": run_id, "from_step": from_step})
    else:
        typer.echo(new_id)


@app.command()
def signal(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run to send the event to."),
    event: str = typer.Argument(..., metavar="EVENT", help="The event a wait_for step of the run waits for."),
    var: list[str] = VAR_OPTION,
    var_file: Path | None = VAR_FILE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Send an event to a run, with a payload.

    The step waiting for EVENT puts the payload (the variables given, as one mapping) in its
    variable, sealed if that variable is declared confidential or secret, and the run goes on. Sent
    before the step waits, the event is kept until it does. Exit 3 if the run was sent EVENT
    already (or stopped waiting for it); 1 for an unknown run or event, or a run that has ended."""
    payload = variables_of(var, var_file) or None
    with client() as client_:
        try:
            receipt = client_.signal(run_id, event, payload)
        except SignalRefused as exc:
            fail(str(exc), EXIT_NOTHING_TO_DO)
    delivered = receipt.wait is not None
    if as_json:
        echo_json({"run_id": run_id, "event": event, "delivered": delivered, "step": receipt.wait.step_id if delivered else None})
    elif delivered:
        typer.echo(f"run {run_id}: {event!r} delivered to step {receipt.wait.step_id}")  # type: ignore[union-attr]
    else:
        typer.echo(f"run {run_id}: {event!r} kept until a step waits for it")


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, option: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (or a plain number of seconds) in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None:
        raise usage_error(option, f"{text!r}: expected a number and a unit (s, m, h, d or w), e.g. 30d")
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


@app.command()
def prune(
    older_than: str = typer.Option(..., "--older-than", metavar="DURATION", help="Finished longer ago than this: 30d, 12h, 90m, 45s, 2w."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete the runs that finished long ago.

    Runs that finished longer ago than DURATION lose their ledger rows, contexts and Redis records.
    Exports and blackboard entries stay; a running run is never touched."""
    seconds = parse_duration(older_than, "--older-than")
    with client() as client_:
        report = client_.prune(seconds)
    if as_json:
        echo_json({"older_than_s": seconds, **report})
    else:
        typer.echo(f"pruned {report['runs']} run(s) and {report['contexts']} context(s) that finished over {older_than} ago")
