"""`runctx web`: the web inspector (`runctx.web`), served by uvicorn."""

from __future__ import annotations

import typer

from runctx.cli.base import app, client
from runctx.web.settings import DEFAULT_BIND, WebSettings

GRACE_S = 3  # seconds open pages get to close when the inspector stops


@app.command()
def web(
    bind: str = typer.Option(DEFAULT_BIND, "--bind", envvar="RUNCTX_WEB_BIND", metavar="HOST:PORT", help="Where to listen."),
) -> None:
    """Serve the web inspector: runs, each run's timeline, steps and contexts, live.

    Every request needs credentials: RUNCTX_WEB_PASSWORD (basic auth, user RUNCTX_WEB_USER, by
    default runctx) or RUNCTX_WEB_TOKEN (a bearer token). On a loopback address without them, a
    password is made for this start and printed; elsewhere the command refuses to start."""
    import uvicorn

    from runctx.web.app import create_app

    settings = WebSettings(bind=bind).checked()
    host, port = settings.host_and_port()
    with client() as client_:
        application = create_app(client_, settings)
        typer.echo(f"runctx inspector on http://{host}:{port}/ (user {settings.user})")
        if not WebSettings().has_credentials:
            typer.echo(f"password for this start: {settings.password}")
        # An open event stream never ends by itself: on SIGTERM or Ctrl-C, pages get this long.
        uvicorn.run(application, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE_S)
