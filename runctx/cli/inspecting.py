"""`runctx runs`, `status` and `context`: what runs there are and where each stands."""

from __future__ import annotations

import json

import typer

from runctx.cli.base import JSON_OPTION, app, client, echo_json, one_line, usage_error
from runctx.cli.running import states_until_end, totals_line

RUN_STATUSES = ("running", "succeeded", "failed", "cancelled")
WATCH_POLL_S = 0.5


@app.command()
def runs(
    status: str | None = typer.Option(None, "--status", metavar="STATUS", help=f"Only runs of this status ({', '.join(RUN_STATUSES)})."),
    routine: str | None = typer.Option(None, "--routine", metavar="NAME", help="Only runs of this routine."),
    limit: int = typer.Option(50, "--limit", min=1, max=10_000, metavar="N", help="At most this many, newest first."),
    as_json: bool = JSON_OPTION,
) -> None:
    """List runs, newest first."""
    if status is not None and status not in RUN_STATUSES:
        raise usage_error("--status", f"{status!r}: expected one of {', '.join(RUN_STATUSES)}")
    with client() as client_:
        found = client_.runs(status=status, routine=routine, limit=limit)
    if as_json:
        echo_json({"runs": found})
        return
    for run in found:
        typer.echo(f"{run['run_id']:<34} {run['status']:<10} {run['routine']}@{run['version']}  {run['created_at']}  steps={run['steps']}")


@app.command()
def status(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run to show."),
    watch: bool = typer.Option(False, "--watch", help="Print the totals each time they change, until the run ends."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show where a run stands, step by step.

    Each step's state, worker, attempts and duration, the totals, and the run's error with the
    failed step's traceback (unless the step read secret values)."""
    with client() as client_:
        if watch:
            last = None
            for states in states_until_end(client_, run_id, None, poll_s=WATCH_POLL_S):
                line = totals_line(states)
                if line != last and not as_json and states["status"] == "running":
                    typer.echo(line)
                    last = line
        else:
            states = client_.step_states(run_id)
    if as_json:
        echo_json(states)
        return
    typer.echo(f"run {run_id}: {states['status']} ({states['routine']}@{states['version']})")
    for step in states["steps"]:
        duration = "" if step["duration_s"] is None else f"{step['duration_s'] * 1000:.1f} ms"
        typer.echo(f"  {step['id']:<30} {step['state']:<9} {step['worker'] or '-':<28} attempts={step['attempts']} {duration}")
    typer.echo(totals_line(states))
    if states["error"]:
        typer.echo(f"error: {one_line(states['error'])}")
    for step in states["steps"]:
        if step.get("traceback"):
            typer.echo(f"traceback of step {step['id']!r}:")
            for line in step["traceback"].rstrip().splitlines():
                typer.echo(f"  {line}")


@app.command()
def context(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run whose contexts to show."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show a run's contexts and their values.

    The root first, then each sub-routine's: its version in L2 and L3, whether its write-behind is
    pending, and its values (confidential and secret ones masked)."""
    with client() as client_:
        tree = client_.context_tree(run_id)
    if as_json:
        echo_json(tree)
        return
    typer.echo(f"run {run_id}: {tree['status']}")
    for ctx in tree["contexts"]:
        indent = "  " * (1 + (ctx["path"].count("/") + 1 if ctx["path"] else 0))
        pending = ", write-behind pending" if ctx["pending_write"] else ""
        in_l2 = "not in L2" if ctx["version_l2"] is None else f"L2 v{ctx['version_l2']}"
        in_l3 = "not in L3" if ctx["version_l3"] is None else f"L3 v{ctx['version_l3']}"
        typer.echo(f"{indent}{ctx['path'] or '(root)'} [{ctx['routine']}] {in_l2}, {in_l3}{pending}")
        for name, value in sorted(ctx["variables"].items()):
            typer.echo(f"{indent}  {name} = {one_line(json.dumps(value))[:200]}")

