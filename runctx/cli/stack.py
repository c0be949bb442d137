"""`runctx stack up | down | status`: the embedded Redis and PostgreSQL, kept up between commands."""

from __future__ import annotations

import typer

from runctx.cli.base import EXIT_NOTHING_TO_DO, JSON_OPTION, app, echo_json, fail
from state.errors import RunctxError
from state.settings import get_settings

stack_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The embedded Redis and PostgreSQL, kept up between commands.")
app.add_typer(stack_app, name="stack")


@stack_app.command("up")
def stack_up(as_json: bool = JSON_OPTION) -> None:
    """Start the embedded servers and keep them up.

    They stay up after this command, until `runctx stack down`."""
    from runctx.embedded import describe, keep_up
    from state.migrate import upgrade

    settings = get_settings()
    try:
        stack, started = keep_up(settings.data_dir)
        upgrade(stack.database_url)
        stack.stop()  # this command's lease; the keeper holds its own
    except RunctxError as exc:
        fail(str(exc))
    state = describe(settings.data_dir)
    if as_json:
        echo_json(state)
    else:
        typer.echo(f"embedded stack {'up' if started else 'was up already'} in {state['data_dir']}; "
                   "runctx commands and workers with no RUNCTX_REDIS_URL/RUNCTX_DATABASE_URL use it")


@stack_app.command("down")
def stack_down(as_json: bool = JSON_OPTION) -> None:
    """Let the embedded servers stop.

    At once, or when the last process using them exits; exit 3 if they were not running."""
    from runctx.embedded import describe, release_keeper, wait_stopped

    settings = get_settings()
    if describe(settings.data_dir)["status"] != "up":
        if as_json:
            echo_json({**describe(settings.data_dir), "released": False})
        else:
            typer.echo(f"runctx: the embedded stack in {settings.data_dir} is not running: nothing to stop", err=True)
        raise typer.Exit(EXIT_NOTHING_TO_DO)
    released = release_keeper(settings.data_dir)
    stopped = wait_stopped(settings.data_dir)
    state = describe(settings.data_dir)
    if as_json:
        echo_json({**state, "released": released})
    elif stopped:
        typer.echo(f"embedded stack in {state['data_dir']} is down")
    else:
        typer.echo(f"embedded stack in {state['data_dir']} stays up while {state['owners']} process(es) use it; "
                   "it stops when the last one exits")


@stack_app.command("status")
def stack_status(as_json: bool = JSON_OPTION) -> None:
    """Say whether the embedded servers run.

    For how many processes, and where their sockets are; exit 3 if they do not run."""
    from runctx.embedded import describe

    state = describe(get_settings().data_dir)
    if as_json:
        echo_json(state)
    elif state["status"] == "up":
        typer.echo(f"embedded stack up in {state['data_dir']}: redis pid {state['redis_pid']}, postgres pid "
                   f"{state['postgres_pid']}, used by {state['owners']} process(es){', kept up' if state['kept_up'] else ''}")
    else:
        typer.echo(f"embedded stack down in {state['data_dir']}")
    if state["status"] != "up":
        raise typer.Exit(EXIT_NOTHING_TO_DO)
