"""`runctx history`, `runctx diff` (and `context --at`, in `inspecting`): what each step of a run
changed, and the run's contexts at any step, replayed from the history without running anything."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import typer

from runctx.cli.base import JSON_OPTION, app, client, echo_json, one_line

VALUE_WIDTH = 120  # a value is cut to this many characters in a line (--json gives it whole)


def shown(value: Any) -> str:
    return one_line(json.dumps(value))[:VALUE_WIDTH]


@app.command()
def history(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run whose history to show."),
    context: str | None = typer.Option(None, "--context", metavar="PATH", help="Only this context (its path in the run, or its id)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show what each step of a run changed, oldest first.

    Each commit with its step, attempt, worker, time and the context version it made, and each
    variable it set or deleted (confidential and secret values masked); events (a skipped,
    retried or failed step, a rewind, the run's end) in between."""
    with client() as client_:
        found = client_.history(run_id, context=context)
    if as_json:
        echo_json(found)
        return
    typer.echo(f"run {run_id}: {found['status']}, {found['total']} entries")
    for entry in found["entries"]:
        for line in entry_lines(entry):
            typer.echo(line)


def entry_lines(entry: dict[str, Any]) -> list[str]:
    at = dt.datetime.fromtimestamp(entry["at"]).strftime("%H:%M:%S.%f")[:-3]
    where = entry["context"] or "(root)"
    if entry["kind"] == "event":
        note = f" ({one_line(entry['note'])[:160]})" if entry["note"] else ""
        return [f"{at}  {entry['step_id'] or '-':<28} {entry['status']:<10} {where}{note}"]
    what = entry["step_id"] or ("(created)" if entry["kind"] == "created" else "(edit)")
    duration = "" if entry["duration_s"] is None else f" {entry['duration_s'] * 1000:.1f} ms"
    attempt = f" attempt {entry['attempt']}" if entry["attempt"] > 1 else ""
    lines = [f"{at}  {what:<28} v{entry['previous']}->v{entry['version']} {where} {entry['worker']}{attempt}{duration}".rstrip()]
    for change in entry["changes"]:
        value = "(deleted)" if change["op"] == "delete" else shown(change["value"])
        lines.append(f"    {change['name']} = {value}")
    return lines


@app.command()
def diff(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run."),
    step_a: str = typer.Argument(..., metavar="STEP_A", help="The step whose context to start from (just after it)."),
    step_b: str = typer.Argument(..., metavar="STEP_B", help="The step whose context to compare with (just after it)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show how a run's context changed between two steps.

    Each variable added, removed or changed from just after STEP_A to just after STEP_B, built
    from the run's history (confidential and secret values masked)."""
    with client() as client_:
        found = client_.diff(run_id, step_a, step_b)
    if as_json:
        echo_json(found)
        return
    typer.echo(f"run {run_id}: {step_a} (v{found['from']['version']}) -> {step_b} (v{found['to']['version']})")
    if not found["changes"]:
        typer.echo("  no difference")
    for row in found["changes"]:
        if row["change"] == "added":
            typer.echo(f"  + {row['name']} = {shown(row['after'])}")
        elif row["change"] == "removed":
            typer.echo(f"  - {row['name']} (was {shown(row['before'])})")
        else:
            typer.echo(f"  ~ {row['name']}: {shown(row['before'])} -> {shown(row['after'])}")


def print_context_at(found: dict[str, Any]) -> None:
    where = found["context"] or "(root)"
    typer.echo(f"run {found['run_id']}: {where} just after {found['step']} (v{found['version']}, epoch {found['epoch']})")
    for name, value in sorted({**found["variables"], **found["intermediate"]}.items()):
        typer.echo(f"  {name} = {shown(value)}")
