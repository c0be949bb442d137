"""The inspector's application: the guard around everything, the JSON API, the pages, the static
files, and the live hub started and stopped with it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from runctx.web import api, pages
from runctx.web.live import ALL_RUNS, LiveHub
from runctx.web.security import Guard, GuardMiddleware
from runctx.web.settings import WebSettings
from state.errors import RunctxError
from state.watch import RunWatch

if TYPE_CHECKING:
    from runctx.api import Client


def create_app(client: Client, settings: WebSettings) -> FastAPI:
    """The inspector of the runs ``client`` sees; ``settings`` must hold credentials (`WebSettings.checked`)."""
    guard = Guard(settings)

    def read(key: str) -> dict:
        return api.live_runs(client, key) if key.startswith(ALL_RUNS) else api.live_run(client, key)

    hub = LiveHub(lambda heard: RunWatch(client.store, heard), read)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await hub.start()
        yield
        await hub.stop()

    app = FastAPI(
        title="runctx inspector", summary="Runs, their steps, what each step changed, and their contexts at any step.",
        openapi_url="/api/openapi.json", docs_url=None, redoc_url=None, lifespan=lifespan,
    )
    app.add_middleware(GuardMiddleware, guard=guard)
    app.include_router(api.router(client, hub, guard.csrf_token))
    app.include_router(pages.router(client, guard.csrf_token))
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")

    @app.exception_handler(RunctxError)
    async def runctx_error(_: Request, exc: RunctxError) -> JSONResponse:
        return api.error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # One line naming the field, never the input (a signal's payload may be a secret).
        problem = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "bad request"}
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
        return JSONResponse({"error": f"{where}: {problem.get('msg', 'bad request')}"}, status_code=422)

    return app
