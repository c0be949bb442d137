"""A run's history: one entry per committed version of each of its contexts, and its events.

An entry says which step made a context's version (or that the context was created, or edited
outside a step), on which worker, at which attempt, when, and what it changed: each changed
variable's name, operation and value after the change. Confidential and secret values are
sealed in it as in the context itself (bound to the entry's place, so a sealed value cannot be
moved), and shown masked. Events (a retry, a skipped step, a failure, a rewind, a cancel) are
entries without a version.

Entries ride with what makes them: a step's commit pushes its entry onto the context's history
list in L2 in the same atomic step, and the write-behind moves the lists to L3 with the
snapshots, in the same transaction. Pure data and rules here; `state.run_history` reads and
writes them.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from state.codec import Codec
from state.models import RunContext
from state.sealing import binding
from state.sensitivity import DataSensitivity

MASK = "***"
CREATED, STEP, EDIT, EVENT = "created", "step", "edit", "event"
VERSIONED = (CREATED, STEP, EDIT)  # the kinds that made a version of a context


@dataclass(frozen=True)
class Change:
    """One variable as a commit left it: ``op`` "set" (with the value after) or "delete"."""

    name: str
    op: str
    value: Any = None
    scope: str = "variables"
    sensitivity: str = "public"
    held: str = ""  # as L3 stores it: the digest of a large value held beside the entry (value None)

    @property
    def masked(self) -> bool:
        return DataSensitivity(self.sensitivity).masked

    def shown(self) -> Any:
        """The value as a reader may see it: confidential and secret ones masked."""
        return MASK if self.masked and self.op != "delete" else self.value


@dataclass(frozen=True)
class HistoryEntry:
    """One line of a run's history (see the module's docstring). ``version`` is the context version
    the entry made (``previous`` the one before); an event keeps the version it happened at."""

    id: str
    run_id: str
    context_id: str
    kind: str
    step_id: str = ""
    epoch: int = 1
    version: int = 0
    previous: int = 0
    at: float = 0.0
    started: float | None = None
    worker: str = "-"
    attempt: int = 1
    status: str = "done"
    note: str = ""
    changes: tuple[Change, ...] = field(default_factory=tuple)

    @property
    def made_version(self) -> bool:
        return self.kind in VERSIONED and self.version == self.previous + 1

    @property
    def duration_s(self) -> float | None:
        return None if self.started is None else max(0.0, self.at - self.started)

    def to_json(self) -> str:
        # By hand, not `asdict`: every commit makes one, and asdict copies every value deeply.
        fields = {name: getattr(self, name) for name in _FIELDS}
        fields["changes"] = [
            {"name": c.name, "op": c.op, "value": c.value, "scope": c.scope, "sensitivity": c.sensitivity, **({"held": c.held} if c.held else {})}
            for c in self.changes
        ]
        return _ENCODER.encode(fields)

    @classmethod
    def from_json(cls, raw: str | bytes | dict[str, Any]) -> HistoryEntry:
        data = dict(raw) if isinstance(raw, dict) else json.loads(raw)
        changes = tuple(Change(**change) for change in data.pop("changes", ()))
        return cls(**data, changes=changes)

    def public(self) -> dict[str, Any]:
        """The entry as the CLI's ``--json`` and the web API show it: values masked where sensitive."""
        shown = asdict(self)
        shown["duration_s"] = None if self.duration_s is None else round(self.duration_s, 6)
        shown["changes"] = [
            {"name": c.name, "op": c.op, "scope": c.scope, "sensitivity": c.sensitivity, "value": c.shown()}
            for c in self.changes
        ]
        return shown


_FIELDS = tuple(name for name in HistoryEntry.__dataclass_fields__ if name != "changes")
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def commit_id(context_id: str, epoch: int, version: int) -> str:
    """A version's entry id: the same entry written twice (a flush made again) is stored once."""
    return f"{context_id}@{epoch}.{version}"


def event_id() -> str:
    return f"event-{secrets.token_hex(8)}"


def _changes(ctx: RunContext, names: Iterable[str], codec: Codec, epoch: int, version: int) -> tuple[Change, ...]:
    changes = []
    levels = ctx.sensitivity_map
    for name in names:
        scope = "variables" if name in ctx.variables else "intermediate" if name in ctx.intermediate else None
        level = DataSensitivity(levels.get(name, DataSensitivity.PUBLIC))
        if scope is None:
            changes.append(Change(name, "delete", None, "variables", level.value))
            continue
        value = ctx.variables[name] if scope == "variables" else ctx.intermediate[name]
        if level.masked and codec.keyring is not None:
            value = codec.keyring.seal(value, _binding(ctx.run_id, ctx.context_id, epoch, version, name, level.value))
        changes.append(Change(name, "set", value, scope, level.value))
    return tuple(changes)


def _binding(run_id: str, context_id: str, epoch: int, version: int, name: str, level: str) -> bytes:
    return binding(run_id, context_id, f"history@{epoch}.{version}", name, level)


def commit_entry(
    ctx: RunContext, previous: int, *, codec: Codec, now: float, step_id: str = "", worker: str = "-",
    duration_s: float | None = None, attempt: int = 1, status: str = "done",
) -> HistoryEntry:
    """The entry of a commit that made ``ctx.version`` from ``previous``: what it changed is what the
    working copy was told to change (`RunContext.touched`)."""
    names = sorted(ctx.touched())
    return HistoryEntry(
        id=commit_id(ctx.context_id, ctx.epoch, ctx.version), run_id=ctx.run_id, context_id=ctx.context_id,
        kind=STEP if step_id else EDIT, step_id=step_id, epoch=ctx.epoch, version=ctx.version, previous=previous,
        at=now, started=None if duration_s is None else now - duration_s, worker=worker, attempt=attempt,
        status=status, changes=_changes(ctx, names, codec, ctx.epoch, ctx.version),
    )


def created_entry(ctx: RunContext, *, codec: Codec, now: float) -> HistoryEntry:
    """The entry of a context's creation at version 1: every variable it started with."""
    names = [*ctx.variables, *ctx.intermediate]
    return HistoryEntry(
        id=commit_id(ctx.context_id, ctx.epoch, 1), run_id=ctx.run_id, context_id=ctx.context_id, kind=CREATED,
        epoch=ctx.epoch, version=1, previous=0, at=now, changes=_changes(ctx, names, codec, ctx.epoch, 1),
    )


def event_entry(
    run_id: str, context_id: str, status: str, *, now: float, step_id: str = "", note: str = "", epoch: int = 1,
    version: int = 0, worker: str = "-", attempt: int = 1, duration_s: float | None = None,
) -> HistoryEntry:
    """An event of a run: a retry, a skip, a failure, a rewind, a cancel (``status`` says which)."""
    return HistoryEntry(
        id=event_id(), run_id=run_id, context_id=context_id, kind=EVENT, step_id=step_id, epoch=epoch,
        version=version, previous=version, at=now, started=None if duration_s is None else now - duration_s,
        worker=worker, attempt=attempt, status=status, note=note,
    )


def open_change(change: Change, entry: HistoryEntry, codec: Codec) -> Any:
    """A change's value with a sealed value opened (for a fork, which needs the real values)."""
    if not change.masked or codec.keyring is None or change.op == "delete":
        return change.value
    associated = _binding(entry.run_id, entry.context_id, entry.epoch, entry.version, change.name, change.sensitivity)
    return codec.keyring.open(change.value, associated, where=f"history of {entry.context_id}")


def resealed(entry: HistoryEntry, codec: Codec) -> HistoryEntry:
    """The entry with its sealed values sealed again under the newest key (a key rotation)."""
    if codec.keyring is None:
        return entry
    changes = []
    for change in entry.changes:
        if change.masked and change.op != "delete":
            value = open_change(change, entry, codec)
            associated = _binding(entry.run_id, entry.context_id, entry.epoch, entry.version, change.name, change.sensitivity)
            change = dataclasses.replace(change, value=codec.keyring.seal(value, associated))
        changes.append(change)
    return dataclasses.replace(entry, changes=tuple(changes))


# ---- time travel -----------------------------------------------------------------------------------


@dataclass
class ContextState:
    """A context's variables as they were at one entry: ``values`` by name, with scope and sensitivity."""

    context_id: str
    version: int
    epoch: int
    values: dict[str, Change] = field(default_factory=dict)
    set_by: dict[str, str] = field(default_factory=dict)  # name -> the entry that set it

    def apply(self, entry: HistoryEntry) -> None:
        for change in entry.changes:
            if change.op == "delete":
                self.values.pop(change.name, None)
            else:
                self.values[change.name] = change
                self.set_by[change.name] = entry.id

    def shown(self) -> dict[str, Any]:
        return {name: change.shown() for name, change in sorted(self.values.items()) if change.scope == "variables"}

    def intermediate_shown(self) -> dict[str, Any]:
        return {name: change.shown() for name, change in sorted(self.values.items()) if change.scope != "variables"}


def lineage(entries: Sequence[HistoryEntry], target: HistoryEntry) -> list[HistoryEntry]:
    """The entries whose versions lead to ``target``'s, oldest first. A rewind starts a new epoch from
    an older version: each version's entry is the one of the newest epoch not after the target's."""
    made = {}
    for entry in entries:
        if entry.context_id == target.context_id and entry.made_version:
            made.setdefault(entry.version, []).append(entry)
    chain: list[HistoryEntry] = []
    version, epoch = target.version, target.epoch
    while version >= 1:
        candidates = [entry for entry in made.get(version, ()) if entry.epoch <= epoch]
        if not candidates:
            break
        entry = max(candidates, key=lambda e: e.epoch)
        chain.append(entry)
        version, epoch = entry.previous, entry.epoch
    chain.reverse()
    return chain


def state_at(entries: Sequence[HistoryEntry], target: HistoryEntry) -> ContextState:
    """The context of ``target`` just after it (an event: at the version it happened at), replayed
    from its creation; nothing runs. Incomplete when the history lost its first entries (pruned)."""
    anchor = target
    if not target.made_version:
        # An event: the version it happened at (of its epoch, or the one it continued from); one that
        # names none, the newest version of its context made before it.
        made = [e for e in entries if e.context_id == target.context_id and e.made_version and e.epoch <= target.epoch]
        if target.version:
            made = [e for e in made if e.version == target.version]
        else:
            made = [e for e in made if e.at <= target.at]
        if not made:
            return ContextState(target.context_id, target.version, target.epoch)
        anchor = max(made, key=lambda e: (e.epoch, e.version))
    state = ContextState(target.context_id, anchor.version, anchor.epoch)
    for entry in lineage(entries, anchor):
        state.apply(entry)
    return state


def before_and_after(entries: Sequence[HistoryEntry], target: HistoryEntry) -> list[dict[str, Any]]:
    """What ``target`` changed, each variable shown before -> after (masked where sensitive)."""
    chain = lineage(entries, target) if target.made_version else []
    before = ContextState(target.context_id, target.previous, target.epoch)
    for entry in chain[:-1]:
        before.apply(entry)
    rows = []
    for change in target.changes:
        old = before.values.get(change.name)
        rows.append({
            "name": change.name, "op": change.op, "sensitivity": change.sensitivity,
            "before": None if old is None else old.shown(), "existed": old is not None,
            "after": None if change.op == "delete" else change.shown(),
        })
    return rows


def diff(a: ContextState, b: ContextState) -> list[dict[str, Any]]:
    """The variables that differ between two states (a sealed value differs when another entry set it:
    its ciphertext says nothing about its value)."""
    rows = []
    for name in sorted(a.values.keys() | b.values.keys()):
        old, new = a.values.get(name), b.values.get(name)
        if old is not None and new is not None and old.sensitivity == new.sensitivity:
            same = a.set_by.get(name) == b.set_by.get(name) if old.masked else old.value == new.value
            if same:
                continue
        change = "added" if old is None else "removed" if new is None else "changed"
        rows.append({
            "name": name, "change": change, "before": None if old is None else old.shown(),
            "after": None if new is None else new.shown(),
        })
    return rows
