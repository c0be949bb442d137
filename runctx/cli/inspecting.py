"""`runctx runs`, `status` and `context`: what runs there are and where each stands."""

from __future__ import annotations

import json
from typing import Any

import typer

from runctx.cli.base import JSON_OPTION, app, client, echo_json, one_line, usage_error
from runctx.cli.history import print_context_at
from runctx.cli.running import states_until_end, totals_line
from tasks.plan import template_of

RUN_STATUSES = ("running", "waiting", "succeeded", "failed", "cancelled")
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
    every: bool = typer.Option(False, "--all", help="List every item of a fan-out (else a long one is folded)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show where a run stands, step by step.

    Each step's state, worker, attempts and duration (why it was skipped or failed, its retries),
    the totals, and the run's error with the failed step's traceback (unless the step read secret
    values). A fan-out's step is listed once per item; past 20 items the done ones are folded
    into one line unless --all."""
    with client() as client_:
        if watch:
            last = None
            for states in states_until_end(client_, run_id, None, poll_s=WATCH_POLL_S):
                line = totals_line(states)
                if line != last and not as_json and states["status"] in ("running", "waiting"):
                    typer.echo(line)
                    last = line
        else:
            states = client_.step_states(run_id)
    if as_json:
        echo_json(states)
        return
    typer.echo(f"run {run_id}: {states['status']} ({states['routine']}@{states['version']})")
    for wait in states.get("waiting_for", []):
        until = f" until {wait['deadline']}" if wait["deadline"] else ""
        typer.echo(f"waiting for event {wait['event']!r} (step {wait['step']}){until}")
    for line in step_lines(states["steps"], fold=not every):
        typer.echo(line)
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
    at: str | None = typer.Option(None, "--at", metavar="STEP_ID", help="The context as it was just after this step (from the history)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show a run's contexts and their values.

    The root first, then each sub-routine's: its version in L2 and L3, whether its write-behind is
    pending, and its values (confidential and secret ones masked). With --at, the context the step
    changed as it was just after it, replayed from the run's history (nothing runs)."""
    if at is not None:
        with client() as client_:
            found = client_.context_at(run_id, at)
        echo_json(found) if as_json else print_context_at(found)
        return
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


FOLD_AFTER = 20  # a fan-out step's items listed one by one up to this many (more with --all)


def step_lines(steps: list[dict[str, Any]], *, fold: bool) -> list[str]:
    """One line per step; a fan-out step's done items past the first few folded into one line."""
    lines: list[str] = []
    groups: list[list[dict[str, Any]]] = []
    for step in steps:
        if groups and "[" in step["id"] and template_of(step["id"]) == template_of(groups[-1][0]["id"]):
            groups[-1].append(step)
        else:
            groups.append([step])
    for group in groups:
        folded = [step for step in group[5:] if step["state"] == "done"] if fold and len(group) > FOLD_AFTER else []
        for step in group:
            if step not in folded:
                lines.append(_step_line(step))
        if folded:
            lines.append(f"  {template_of(group[0]['id']):<30} ... {len(folded)} more items done (--all lists each)")
    return lines


def _step_line(step: dict[str, Any]) -> str:
    duration = "" if step["duration_s"] is None else f"{step['duration_s'] * 1000:.1f} ms"
    line = f"  {step['id']:<30} {step['state']:<9} {step['worker'] or '-':<28} attempts={step['attempts']} {duration}"
    if step.get("retries"):
        line += f" retried {len(step['retries'])}x"
    if step.get("reason") and step["state"] != "done":
        line += f" ({one_line(step['reason'])[:160]})"
    elif step.get("event"):
        line += f" (event {step['event']!r})"
    return line.rstrip()
