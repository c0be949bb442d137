"""The inspector's HTML pages: the runs list and a run's page. Each is a Jinja2 template filled with
what the server knows at once (the run's status, totals and error); the rest (timeline, steps,
contexts, time travel) is drawn by ``static/inspector.js`` from the JSON API and kept live by the
run's event stream. No inline script: the CSRF token and the run's id travel in data attributes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from runctx.web.api import RUNS_SHOWN

if TYPE_CHECKING:
    from runctx.api import Client

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
STATUSES = ("running", "waiting", "succeeded", "failed", "cancelled")


def router(client: Client, csrf: Any) -> APIRouter:
    pages = APIRouter(include_in_schema=False)

    def render(request: Request, name: str, **context: Any) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, name, {"csrf": csrf(request.state.identity), **context})

    @pages.get("/", response_class=HTMLResponse)
    def runs(request: Request, status: str | None = None, routine: str | None = None) -> HTMLResponse:
        status = status if status in STATUSES else None
        found = client.runs(status=status, routine=routine or None, limit=RUNS_SHOWN)
        return render(request, "runs.html", runs=found, status=status or "", routine=routine or "", statuses=STATUSES)

    @pages.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @pages.get("/runs/{run_id}", response_class=HTMLResponse)
    def run(request: Request, run_id: str) -> HTMLResponse:
        states = client.step_states(run_id)
        return render(request, "run.html", run=states)

    return pages
