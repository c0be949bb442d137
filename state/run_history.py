"""Runs' histories across the tiers: entries made with commits, events recorded as they happen, moved
to L3 by the write-behind and a run's finish, and read back from both tiers (`state.history` says
what an entry is)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

from state.codec import Codec
from state.errors import CommunicationFailure
from state.history import HistoryEntry, commit_entry, event_entry
from state.tiers.contracts import L2Tier, L3Tier
from state.tiers.data import CommitRequest, watch_message

log = logging.getLogger(__name__)


class RunHistory:
    """Owns nothing but its tiers. Promises: every commit that makes a version carries its entry
    (so the entry exists exactly when the version does); an entry reaches L3 once, in the
    transaction that writes its context (or finishes its run); a reader sees L3's entries and
    those still waiting in L2, each once."""

    def __init__(self, l2: L2Tier, l3: L3Tier, *, codec: Codec, clock: Callable[[], float], keep: bool = True) -> None:
        self.l2, self.l3 = l2, l3
        self.codec = codec
        self.clock = clock
        self.keep = keep  # RUNCTX_HISTORY: off, commits carry no entry and events are not kept

    def attach(self, request: CommitRequest, now: float) -> CommitRequest:
        """``request`` with its history entry, when it makes a new version of its context."""
        ctx = request.context
        if not self.keep or request.history is not None or ctx.version != request.expected_version + 1:
            return request
        report = request.report
        entry = commit_entry(
            ctx, request.expected_version, codec=self.codec, now=now, step_id=request.step_id or "",
            worker=report.worker if report else "-", duration_s=report.duration_s if report else None,
            attempt=report.attempts if report else 1,
        )
        return dataclasses.replace(request, history=entry.to_json())

    def record(self, entry: HistoryEntry) -> None:
        """Keep an event in its context's history list (it reaches L3 with the context's next write
        or its run's finish). Best effort: a lost event never fails what it reports."""
        if not self.keep:
            return
        try:
            watch = watch_message(entry.run_id, entry.context_id, entry.version, entry.step_id, entry.status)
            self.l2.push_history(entry.context_id, entry.to_json(), watch)
        except CommunicationFailure as exc:
            log.warning("run %s: history event %s not kept (%s)", entry.run_id, entry.status, exc)

    def event(self, run_id: str, context_id: str, status: str, **fields: object) -> None:
        """Record an event (`state.history.event_entry` says what it may carry)."""
        self.record(event_entry(run_id, context_id, status, now=self.clock(), **fields))  # type: ignore[arg-type]

    def record_in_l3(self, entries: Sequence[HistoryEntry]) -> None:
        """Store entries in L3 at once (what happens where L2 may be gone: a rewind)."""
        self.l3.add_history(entries)

    def to_write(self, context_ids: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """The entries waiting in L2 for these contexts, as they are stored (JSON: L3 reads them as
        they come), and the last of each list (what the write that takes them clears up to).
        Anything in a list that is not an entry's JSON (damage) is left out, and cleared with it."""
        lists = self.l2.history_lists(list(context_ids))
        raws = [raw for found in lists.values() for raw in found if raw.startswith('{"id":')]
        return raws, {context_id: found[-1] for context_id, found in lists.items() if found}

    def waiting(self, context_ids: Sequence[str]) -> list[HistoryEntry]:
        """The entries waiting in L2 for these contexts (an unreadable one is left out)."""
        entries: list[HistoryEntry] = []
        for context_id, raws in self.l2.history_lists(list(context_ids)).items():
            for raw in raws:
                try:
                    entries.append(HistoryEntry.from_json(raw))
                except (ValueError, TypeError, KeyError) as exc:
                    log.error("context %s: an unreadable history entry (%s)", context_id, exc)
        return entries

    def stored(self, run_id: str, *, after: int = 0, known: frozenset[str] = frozenset()) -> tuple[list[HistoryEntry], int]:
        """The run's entries L3 stored after the mark ``after`` but those in ``known``, and the
        newest mark (`L3History.run_history` says how a reader that keeps entries uses them)."""
        return self.l3.run_history(run_id, after=after, known=known)

    def of_run(self, run_id: str, *, context_ids: Sequence[str] = ()) -> list[HistoryEntry]:
        """A run's history, oldest first: L3's entries and those of ``context_ids`` still in L2."""
        stored = {entry.id: entry for entry in self.l3.run_history(run_id)[0]}
        pending = self.waiting(context_ids)
        for entry in pending:
            stored.setdefault(entry.id, entry)
        return sorted(stored.values(), key=order)


def order(entry: HistoryEntry) -> tuple[float, str, int]:
    """The order a history is shown in: by time, then context and version."""
    return entry.at, entry.context_id, entry.version
