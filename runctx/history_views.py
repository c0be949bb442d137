"""What the API, the command and the web inspector show of a run's history: each step with what it
changed, a context as it was just after a step (replayed from the history, nothing runs), and the
difference between two such points. Values of confidential and secret variables are masked in all
of them (`state.history.Change.shown`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from state.errors import InvalidValue, NotFound
from state.history import HistoryEntry, before_and_after, diff, state_at
from state.keys import context_id
from state.run_history import order
from state.store import TieredStore
from state.tiers.data import FINAL_STATUSES

RUNS_KEPT = 16  # runs' histories a reader keeps (a run of 10,000 steps: some MB)
SETTLE_S = 30.0  # an L3 transaction that took its entries' marks commits within this (else it is read late)


@dataclass(frozen=True)
class _Kept:
    """A run's entries as far as L3 had them: sorted, by id, and the mark to read on from."""

    entries: list[HistoryEntry]
    ids: frozenset[str]
    marks: tuple[tuple[float, int], ...] = ()  # (when, the newest mark L3 had then), oldest first

    def settled(self, now: float) -> int:
        """The newest mark read long enough ago that no entry before it can still be uncommitted."""
        return max((mark for when, mark in self.marks if when <= now - SETTLE_S), default=0)

    def extended(self, new: list[HistoryEntry], mark: int, now: float) -> _Kept:
        fresh = [entry for entry in new if entry.id not in self.ids]
        entries = sorted([*self.entries, *fresh], key=order) if fresh else self.entries
        marks = tuple((when, m) for when, m in self.marks if when > now - 2 * SETTLE_S) + ((now, mark),)
        return _Kept(entries, self.ids | {e.id for e in fresh}, marks)


class HistoryReader:
    """Reads runs' histories for the API, the command and the inspector. Owns an LRU of the histories
    it read (an entry never changes once in L3, so only what L3 stored since is read whole again).

    Promises: an answer holds every entry L3 held when asked and, for a running run, the entries
    still waiting in L2, each once, oldest first."""

    def __init__(self, store: TieredStore, *, runs_kept: int = RUNS_KEPT) -> None:
        self.store = store
        self._kept: LRUCache[str, _Kept] = LRUCache(maxsize=runs_kept)
        self._lock = threading.Lock()

    def entries(self, run_id: str, *, context: str | None = None) -> list[HistoryEntry]:
        """The run's history, oldest first. ``context``: a context's path in the run (``""`` the
        root, ``each[3]``) or its id."""
        row = self.store.ledger.get_run(run_id)
        if row is None:
            raise NotFound(f"run {run_id!r} does not exist")
        with self._lock:
            kept = self._kept.get(run_id) or _Kept([], frozenset())
        now = time.time()
        new, mark = self.store.history.stored(run_id, after=kept.settled(now), known=kept.ids)
        kept = kept.extended(new, mark, now)
        with self._lock:
            self._kept[run_id] = kept
        entries = kept.entries
        # Every context of the run has its creation entry in L3: that is where its L2 list is found.
        context_ids = sorted({entry.context_id for entry in entries} | {run_id})
        if row.status not in FINAL_STATUSES:  # a finished run's entries all went to L3 with its end
            pending = self.store.history.waiting(context_ids)
            fresh = [entry for entry in pending if entry.id not in kept.ids]
            if fresh:
                entries = sorted([*entries, *fresh], key=order)
        if context is None:
            return entries
        wanted = _context_id(run_id, context, context_ids)
        return [entry for entry in entries if entry.context_id == wanted]

    def history(self, run_id: str, *, context: str | None = None, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """The ``runctx history --json`` object: each entry (step, context, attempt, worker, times,
        versions, status, what it changed), oldest first, from ``offset``, at most ``limit``."""
        entries = self.entries(run_id, context=context)
        row = self.store.ledger.get_run(run_id)
        window = entries[offset : None if limit is None else offset + limit]
        return {
            "run_id": run_id, "status": row.status if row else None, "total": len(entries), "offset": offset,
            "entries": [_shown(entry, run_id) for entry in window],
        }

    def context_at(self, run_id: str, step_id: str) -> dict[str, Any]:
        """The ``runctx context --at --json`` object: the context the step changed, as it was just after it."""
        entries = self.entries(run_id)
        target = find_step(entries, step_id)
        state = state_at(entries, target)
        return {
            "run_id": run_id, "step": step_id, "context": _path(state.context_id, run_id), "context_id": state.context_id,
            "version": state.version, "epoch": state.epoch, "variables": state.shown(), "intermediate": state.intermediate_shown(),
            "changed": before_and_after(entries, target),
        }

    def step_detail(self, run_id: str, step_id: str) -> dict[str, Any]:
        """The web inspector's step panel: every entry of the step (its attempts, retries, skip or
        failure) and what its commit changed, before -> after."""
        entries = self.entries(run_id)
        target = find_step(entries, step_id)
        return {
            "run_id": run_id, "step": step_id, "entries": [_shown(e, run_id) for e in entries if e.step_id == step_id],
            "changed": before_and_after(entries, target) if target.made_version else [],
        }

    def difference(self, run_id: str, step_a: str, step_b: str) -> dict[str, Any]:
        """The ``runctx diff --json`` object: how the context changed from just after ``step_a`` to just
        after ``step_b`` (each in the context it changed)."""
        if step_a == step_b:
            raise InvalidValue(f"diff: give two different steps (both are {step_a!r})")
        entries = self.entries(run_id)
        a, b = state_at(entries, find_step(entries, step_a)), state_at(entries, find_step(entries, step_b))
        return {
            "run_id": run_id, "from": {"step": step_a, "context": _path(a.context_id, run_id), "version": a.version},
            "to": {"step": step_b, "context": _path(b.context_id, run_id), "version": b.version}, "changes": diff(a, b),
        }


def _context_id(run_id: str, context: str, known: list[str]) -> str:
    for candidate in (context, context_id(run_id, context.strip("/"))):
        if candidate in known:
            return candidate
    raise NotFound(f"run {run_id!r} has no context {context!r} (its contexts: {', '.join(sorted(known))[:300]})")


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
