"""What the API, the command and the web inspector show of a run's history: each step with what it
changed, a context as it was just after a step (replayed from the history, nothing runs), and the
difference between two such points. Values of confidential and secret variables are masked in all
of them (`state.history.Change.shown`)."""

from __future__ import annotations

from typing import Any

from state.errors import InvalidValue, NotFound
from state.history import HistoryEntry, before_and_after, diff, state_at
from state.keys import context_id
from state.store import TieredStore


def entries_of(store: TieredStore, run_id: str, *, context: str | None = None) -> list[HistoryEntry]:
    """The run's history, oldest first: what L3 holds and what still waits in L2. ``context``: a
    context's path in the run (``""`` the root, ``each[3]``) or its id."""
    if store.ledger.get_run(run_id) is None:
        raise NotFound(f"run {run_id!r} does not exist")
    stored = store.l3.run_history(run_id)
    # Every context of the run has its creation entry in L3: that is where its L2 list is found.
    context_ids = sorted({entry.context_id for entry in stored} | {run_id})
    wanted = None if context is None else _context_id(run_id, context, context_ids)
    entries = store.history.of_run(run_id, context_ids=context_ids, context_id=wanted)
    return entries


def _context_id(run_id: str, context: str, known: list[str]) -> str:
    for candidate in (context, context_id(run_id, context.strip("/"))):
        if candidate in known:
            return candidate
    raise NotFound(f"run {run_id!r} has no context {context!r} (its contexts: {', '.join(sorted(known))[:300]})")


def history(store: TieredStore, run_id: str, *, context: str | None = None, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
    """The ``runctx history --json`` object: each entry (step, context, attempt, worker, times,
    versions, status, what it changed), oldest first, from ``offset``, at most ``limit``."""
    entries = entries_of(store, run_id, context=context)
    row = store.ledger.get_run(run_id)
    window = entries[offset : None if limit is None else offset + limit]
    return {
        "run_id": run_id, "status": row.status if row else None, "total": len(entries), "offset": offset,
        "entries": [_shown(entry, run_id) for entry in window],
    }


def _shown(entry: HistoryEntry, run_id: str) -> dict[str, Any]:
    shown = entry.public()
    shown["context"] = _path(entry.context_id, run_id)
    return shown


def _path(ctx_id: str, run_id: str) -> str:
    return "" if ctx_id == run_id else ctx_id.removeprefix(f"{run_id}/")


def find_step(entries: list[HistoryEntry], step_id: str) -> HistoryEntry:
    """The entry of ``step_id``'s commit (of the newest epoch, if a rewind made it twice); else its
    newest event (a skipped or failed step)."""
    made = [entry for entry in entries if entry.step_id == step_id and entry.made_version]
    if made:
        return max(made, key=lambda entry: (entry.epoch, entry.version))
    events = [entry for entry in entries if entry.step_id == step_id]
    if events:
        return events[-1]
    raise NotFound(f"step {step_id!r} is not in the history of run {entries[0].run_id if entries else '?'!r}")


def context_at(store: TieredStore, run_id: str, step_id: str) -> dict[str, Any]:
    """The ``runctx context --at --json`` object: the context the step changed, as it was just after it."""
    entries = entries_of(store, run_id)
    target = find_step(entries, step_id)
    state = state_at(entries, target)
    return {
        "run_id": run_id, "step": step_id, "context": _path(state.context_id, run_id), "context_id": state.context_id,
        "version": state.version, "epoch": state.epoch, "variables": state.shown(), "intermediate": state.intermediate_shown(),
        "changed": before_and_after(entries, target),
    }


def step_detail(store: TieredStore, run_id: str, step_id: str) -> dict[str, Any]:
    """The web inspector's step panel: every entry of the step (its attempts, retries, skip or
    failure) and what its commit changed, before -> after."""
    entries = entries_of(store, run_id)
    target = find_step(entries, step_id)
    return {
        "run_id": run_id, "step": step_id, "entries": [_shown(e, run_id) for e in entries if e.step_id == step_id],
        "changed": before_and_after(entries, target) if target.made_version else [],
    }


def difference(store: TieredStore, run_id: str, step_a: str, step_b: str) -> dict[str, Any]:
    """The ``runctx diff --json`` object: how the context changed from just after ``step_a`` to just
    after ``step_b`` (each in the context it changed)."""
    if step_a == step_b:
        raise InvalidValue(f"diff: give two different steps (both are {step_a!r})")
    entries = entries_of(store, run_id)
    a, b = state_at(entries, find_step(entries, step_a)), state_at(entries, find_step(entries, step_b))
    return {
        "run_id": run_id, "from": {"step": step_a, "context": _path(a.context_id, run_id), "version": a.version},
        "to": {"step": step_b, "context": _path(b.context_id, run_id), "version": b.version}, "changes": diff(a, b),
    }
