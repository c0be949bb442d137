"""The inspector's JSON API under ``/api/``: the objects of the CLI's ``--json`` (runs, status,
history, context, context --at, diff), a run's live events, and cancel, resume, fork and signal. FastAPI describes it at
``/api/openapi.json``. Every value of a confidential or secret variable is masked, as in the CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from runctx.web.live import ALL_RUNS, LiveHub
from state.errors import NotFound, RequestError, RunctxError, RunEnded, SignalRefused

if TYPE_CHECKING:
    from runctx.api import Client

PAGE = 500  # history entries in one answer unless asked for fewer (a run may have 10,000s)
RUNS_SHOWN = 100


def error_response(exc: RunctxError) -> JSONResponse:
    """A runctx error as the API answers it: one line, 404 for what does not exist, 409 for what the
    run's state refuses (an event sent before, a run that ended), 400 for another bad request or
    bad input, 503 for a server that is away."""
    if isinstance(exc, NotFound):
        status = 404
    elif isinstance(exc, (SignalRefused, RunEnded)):
        status = 409
    else:
        status = 400 if isinstance(exc, (RequestError, ValueError)) else 503
    return JSONResponse({"error": " ".join(str(exc).split())[:500]}, status_code=status)


class SignalBody(BaseModel):
    event: str = Field(description="the event a wait_for step of the run waits for")
    payload: Any = Field(None, description="what the step puts in its variable (sealed if that is confidential or secret)")


class ForkBody(BaseModel):
    from_step: str = Field(description="the step the new run starts with")
    variables: dict[str, Any] = Field(default_factory=dict, description="set in the new run's root context first")


def runs_key(status: str | None, routine: str | None) -> str:
    return f"{ALL_RUNS}{status or ''}|{routine or ''}"


def live_run(client: Client, run_id: str) -> dict[str, Any]:
    """What a run's page is sent when the run changes: its status, totals, error and history size."""
    states = client.step_states(run_id)
    found = client.history(run_id, offset=0, limit=0)
    return {
        "run_id": run_id, "status": states["status"], "error": states["error"], "totals": states["totals"],
        "history_total": found["total"], "waiting_for": states["waiting_for"],
    }


def live_runs(client: Client, key: str) -> dict[str, Any]:
    status, _, routine = key.removeprefix(ALL_RUNS).partition("|")
    return {"runs": client.runs(status=status or None, routine=routine or None, limit=RUNS_SHOWN)}


def router(client: Client, hub: LiveHub, csrf: Any) -> APIRouter:
    """The routes, bound to one client (its store and engine) and one live hub."""
    api = APIRouter(prefix="/api")

    @api.get("/csrf", summary="The CSRF token every POST must carry in the X-CSRF-Token header")
    def csrf_token(request: Request) -> dict[str, str]:
        return {"token": csrf(request.state.identity)}

    @api.get("/runs", summary="Runs, newest first (the object of `runctx runs --json`)")
    def runs(status: str | None = None, routine: str | None = None, limit: int = Query(RUNS_SHOWN, ge=1, le=10_000)) -> Any:
        return {"runs": client.runs(status=status, routine=routine, limit=limit)}

    @api.get("/runs/{run_id}", summary="Each step's state and the totals (`runctx status --json`)")
    def run(run_id: str) -> Any:
        return client.step_states(run_id)

    @api.get("/runs/{run_id}/history", summary="What each step changed, oldest first (`runctx history --json`), a page at a time")
    def history(
        run_id: str, context: str | None = None, offset: int = Query(0, ge=0), limit: int = Query(PAGE, ge=0, le=10_000),
        brief: bool = Query(False, description="leave out the changes (for a timeline)"),
    ) -> Any:
        found = client.history(run_id, context=context, offset=offset, limit=limit)
        if brief:
            for entry in found["entries"]:
                entry["changed"] = len(entry.pop("changes"))
        return found

    @api.get("/runs/{run_id}/steps/{step_id:path}", summary="A step's attempts and what it changed, before -> after")
    def step(run_id: str, step_id: str) -> Any:
        return client.step_detail(run_id, step_id)

    @api.get("/runs/{run_id}/contexts", summary="The run's contexts with their versions in L2 and L3 (`runctx context --json`)")
    def contexts(run_id: str) -> Any:
        return client.context_tree(run_id)

    @api.get("/runs/{run_id}/context", summary="The context just after a step, from the history (`runctx context --at --json`)")
    def context_at(run_id: str, at: str) -> Any:
        return client.context_at(run_id, at)

    @api.get("/runs/{run_id}/diff", summary="What changed between just after step a and just after step b (`runctx diff --json`)")
    def diff(run_id: str, a: str, b: str) -> Any:
        return client.diff(run_id, a, b)

    @api.post("/runs/{run_id}/cancel", summary="Cancel a running run (as `runctx cancel`)")
    def cancel(run_id: str) -> Any:
        cancelled = client.cancel(run_id)
        return {"run_id": run_id, "cancelled": cancelled, "status": "cancelled" if cancelled else client.run_status(run_id)}

    @api.post("/runs/{run_id}/resume", summary="Go on with a failed or cancelled run where it stopped (as `runctx resume`)")
    def resume(run_id: str) -> Any:
        resumed = client.resume(run_id)
        return {"run_id": run_id, "resumed": resumed, "status": client.run_status(run_id)}

    @api.post("/runs/{run_id}/signal", summary="Send an event to the run, with a payload (as `runctx signal`)")
    def signal(run_id: str, body: SignalBody) -> Any:
        receipt = client.signal(run_id, body.event, body.payload)
        step = receipt.wait.step_id if receipt.wait is not None else None
        return {"run_id": run_id, "event": body.event, "delivered": step is not None, "step": step}

    @api.post("/runs/{run_id}/fork", summary="A new run from this one as it was just before a step (as `runctx fork`)")
    def fork(run_id: str, body: ForkBody) -> Any:
        new_id = client.fork(run_id, body.from_step, variables=body.variables)
        return {"run_id": new_id, "forked_from": run_id, "from_step": body.from_step}

    @api.get("/runs/{run_id}/events", summary="Server-sent events: the run's status, totals and history size as they change")
    def run_events(run_id: str) -> StreamingResponse:
        client.run_status(run_id)  # 404 before the stream starts
        return StreamingResponse(hub.stream(run_id), media_type="text/event-stream")

    @api.get("/events", summary="Server-sent events: the runs list as it changes")
    def runs_events(status: str | None = None, routine: str | None = None) -> StreamingResponse:
        return StreamingResponse(hub.stream(runs_key(status, routine)), media_type="text/event-stream")

    return api
