"""`runctx worker`: a worker node (Celery's own worker process, with runctx's settings)."""

from __future__ import annotations

import os
import sys

import typer

from runctx.cli.base import app


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
    """Run a worker node (Celery's worker with runctx's settings).

    Start as many as you like, on as many machines.

    Options after `--` go to `celery worker` as they are, e.g. `runctx worker -- --max-tasks-per-child 100`.
    A node that cannot do its job (a key it lacks, a schema it cannot migrate, an action module it
    cannot import) exits 1 with one line naming the setting.
    """
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
