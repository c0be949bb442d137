"""A run's history as pure data: the entries commits, creations and events make, sealed values in
them, and time travel (lineage across a rewind, a context at an entry, before -> after, diffs).

Pure logic: no servers are used (none of conftest's fixtures is requested).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

import pytest

from state.codec import Codec
from state.errors import ContextCorruption
from state.history import (
    CREATED,
    EDIT,
    EVENT,
    MASK,
    STEP,
    Change,
    ContextState,
    HistoryEntry,
    before_and_after,
    commit_entry,
    commit_id,
    created_entry,
    diff,
    event_entry,
    lineage,
    open_change,
    state_at,
)
from state.models import DataSensitivity, RunContext, RunContextInit
from state.sealing import Keyring, is_sealed

TOKEN = "tok-9c1e-plain-secret"
CARD = "4111-1111-plain-card"


# ---- helpers ----------------------------------------------------------------------------------------


def keyring() -> Keyring:
    return Keyring.parse(Keyring.new_entry())


def context(
    variables: dict[str, Any] | None = None, *, intermediate: dict[str, Any] | None = None,
    sensitivity: dict[str, str] | None = None, version: int = 1,
) -> RunContext:
    ctx = RunContext.from_init(
        RunContextInit(
            run_id="run-1", routine_id="r", variables=variables or {}, intermediate=intermediate or {},
            sensitivity_map=sensitivity or {},
        )
    )
    ctx.version = version
    return ctx


def committed(base: RunContext) -> RunContext:
    """A working copy of ``base`` at the next version (what a commit of it carries)."""
    working = base.working_copy()
    working.version = base.version + 1
    return working


def made(epoch: int, version: int, *changes: Change, previous: int | None = None, context_id: str = "run-1") -> HistoryEntry:
    """The entry of a version (``previous``: the one it was made from, the version before by default)."""
    previous = version - 1 if previous is None else previous
    return HistoryEntry(
        id=commit_id(context_id, epoch, version), run_id="run-1", context_id=context_id,
        kind=CREATED if version == 1 else STEP, step_id="" if version == 1 else f"step-{epoch}.{version}",
        epoch=epoch, version=version, previous=previous, at=float(epoch * 100 + version), changes=changes,
    )


def put(name: str, value: Any, sensitivity: str = "public") -> Change:
    return Change(name, "set", value, "variables", sensitivity)


def drop(name: str) -> Change:
    return Change(name, "delete")


def values(state: ContextState) -> dict[str, Any]:
    return {name: change.value for name, change in state.values.items()}


def ids(entries: list[HistoryEntry]) -> list[str]:
    return [entry.id for entry in entries]


def rewound() -> list[HistoryEntry]:
    """Epoch 1 made v1..v5; a rewind went back to v3, and epoch 2 made v4 and v5 from there."""
    return [
        made(1, 1, put("a", 1), put("b", "kept")),
        made(1, 2, put("a", 2)),
        made(1, 3, put("b", "three")),
        made(1, 4, put("a", 4), put("c", "only in epoch 1")),
        made(1, 5, put("a", 5), drop("b")),
        made(2, 4, put("a", 40), previous=3),
        made(2, 5, put("d", "added in epoch 2")),
    ]


# ---- the entries a commit, a creation and an event make ---------------------------------------------


def test_a_commit_entry_holds_exactly_the_touched_names_with_their_values_after() -> None:
    base = context({"a": 1, "b": 2, "c": 3})
    working = committed(base)
    working.set_variable("a", 10)
    working.set_variable("a", 11)  # the value after counts, once
    working.delete_variable("b")
    working.set_variable("scratch", [1, {"x": None}], scope="intermediate")

    entry = commit_entry(working, 1, codec=Codec(), now=100.0, step_id="s1", worker="w-1", duration_s=2.5, attempt=3)

    assert entry.changes == (
        Change("a", "set", 11, "variables", "public"),
        Change("b", "delete", None, "variables", "public"),
        Change("scratch", "set", [1, {"x": None}], "intermediate", "public"),
    )
    assert (entry.id, entry.kind, entry.step_id, entry.epoch, entry.version, entry.previous) == ("run-1@1.2", STEP, "s1", 1, 2, 1)
    assert (entry.worker, entry.attempt, entry.at, entry.started, entry.duration_s) == ("w-1", 3, 100.0, 97.5, 2.5)
    assert entry.made_version


def test_a_commit_without_a_step_is_an_edit_and_an_untouched_copy_changes_nothing() -> None:
    base = context({"a": 1})
    entry = commit_entry(committed(base), 1, codec=Codec(), now=5.0)
    assert (entry.kind, entry.step_id, entry.changes, entry.started, entry.duration_s) == (EDIT, "", (), None, None)


def test_a_commit_entry_records_each_values_sensitivity() -> None:
    base = context({"user": "alice", "note": "n"})
    working = committed(base)
    working.set_variable("level", 3, sensitivity="internal")
    working.set_variable("token", TOKEN, sensitivity="secret")
    working.raise_sensitivity("user", DataSensitivity.CONFIDENTIAL)  # made more sensitive, value unchanged: recorded too

    changes = {c.name: c for c in commit_entry(working, 1, codec=Codec(), now=1.0).changes}

    assert {name: c.sensitivity for name, c in changes.items()} == {"level": "internal", "token": "secret", "user": "confidential"}
    assert {name: c.shown() for name, c in changes.items()} == {"level": 3, "token": MASK, "user": MASK}
    assert changes["token"].value == TOKEN  # no keys: nothing is sealed, but it is never shown


def test_sensitive_values_are_sealed_in_the_entry_and_masked_in_its_public_form() -> None:
    codec = Codec(keyring())
    working = committed(context({"user": "alice"}))
    working.set_variable("token", TOKEN, sensitivity="secret")
    working.set_variable("card", CARD, sensitivity="confidential", scope="intermediate")
    working.set_variable("user", "bob")

    entry = commit_entry(working, 1, codec=codec, now=1.0, step_id="s1")
    changes = {c.name: c for c in entry.changes}

    assert is_sealed(changes["token"].value) and is_sealed(changes["card"].value)
    for text in (entry.to_json(), json.dumps(entry.public())):
        assert TOKEN not in text and CARD not in text
    shown = {c["name"]: c["value"] for c in entry.public()["changes"]}
    assert shown == {"card": MASK, "token": MASK, "user": "bob"}
    assert [open_change(c, entry, codec) for c in entry.changes] == [CARD, TOKEN, "bob"]
    assert open_change(changes["token"], HistoryEntry.from_json(entry.to_json()), codec) == TOKEN


def test_a_sealed_value_opens_only_in_the_entry_it_was_sealed_in() -> None:
    codec = Codec(keyring())
    working = committed(context({}))
    working.set_variable("token", TOKEN, sensitivity="secret")
    entry = commit_entry(working, 1, codec=codec, now=1.0)
    (token,) = entry.changes
    for elsewhere in (replace(entry, version=3, previous=2), replace(entry, context_id="run-1/other"), replace(entry, run_id="run-2")):
        with pytest.raises(ContextCorruption, match="does not open here"):
            open_change(token, elsewhere, codec)
    for moved in (replace(token, name="other"), replace(token, sensitivity="confidential")):  # renamed, relabelled
        with pytest.raises(ContextCorruption, match="does not open here"):
            open_change(moved, entry, codec)


def test_a_created_entry_lists_every_starting_variable() -> None:
    codec = Codec(keyring())
    ctx = context({"a": 1, "token": TOKEN}, intermediate={"scratch": "s"}, sensitivity={"token": "secret"})

    entry = created_entry(ctx, codec=codec, now=7.0)

    assert (entry.id, entry.kind, entry.version, entry.previous, entry.at, entry.made_version) == ("run-1@1.1", CREATED, 1, 0, 7.0, True)
    assert [(c.name, c.op, c.scope, c.sensitivity) for c in entry.changes] == [
        ("a", "set", "variables", "public"), ("token", "set", "variables", "secret"), ("scratch", "set", "intermediate", "public"),
    ]
    assert TOKEN not in entry.to_json()
    assert [open_change(c, entry, codec) for c in entry.changes] == [1, TOKEN, "s"]


def test_an_event_keeps_the_version_it_happened_at_and_makes_none() -> None:
    event = event_entry("run-1", "run-1", "retried", now=10.0, step_id="s2", note="timeout", epoch=2, version=3, duration_s=1.5)
    assert (event.kind, event.status, event.epoch, event.version, event.previous, event.changes) == (EVENT, "retried", 2, 3, 3, ())
    assert (event.started, event.duration_s, event.made_version) == (8.5, 1.5, False)
    assert event.id.startswith("event-")
    assert event.id != event_entry("run-1", "run-1", "retried", now=10.0).id


# ---- time travel ------------------------------------------------------------------------------------


def test_lineage_across_a_rewind_takes_the_newest_epoch_not_after_the_target() -> None:
    entries = rewound()
    random.Random(7).shuffle(entries)  # the order entries are read in does not matter
    by_id = {entry.id: entry for entry in entries}

    assert ids(lineage(entries, by_id["run-1@2.4"])) == ["run-1@1.1", "run-1@1.2", "run-1@1.3", "run-1@2.4"]
    assert ids(lineage(entries, by_id["run-1@2.5"])) == ["run-1@1.1", "run-1@1.2", "run-1@1.3", "run-1@2.4", "run-1@2.5"]
    assert ids(lineage(entries, by_id["run-1@1.5"])) == ["run-1@1.1", "run-1@1.2", "run-1@1.3", "run-1@1.4", "run-1@1.5"]


def test_a_context_at_an_entry_replays_its_lineage_only() -> None:
    entries = rewound()
    by_id = {entry.id: entry for entry in entries}

    at_epoch_2 = state_at(entries, by_id["run-1@2.4"])
    assert values(at_epoch_2) == {"a": 40, "b": "three"}  # epoch 1's v4 and v5 are not in it
    assert (at_epoch_2.epoch, at_epoch_2.version) == (2, 4)
    assert at_epoch_2.set_by == {"a": "run-1@2.4", "b": "run-1@1.3"}

    assert values(state_at(entries, by_id["run-1@1.5"])) == {"a": 5, "c": "only in epoch 1"}
    assert values(state_at(entries, by_id["run-1@2.5"])) == {"a": 40, "b": "three", "d": "added in epoch 2"}


def test_other_contexts_and_events_do_not_change_a_replay() -> None:
    entries = rewound() + [
        made(1, 1, put("a", "other context"), context_id="run-1/sub"),
        made(1, 2, put("a", "other context"), context_id="run-1/sub"),
        event_entry("run-1", "run-1", "retried", now=1.0, epoch=1, version=2),
    ]
    target = next(entry for entry in entries if entry.id == "run-1@2.4")
    assert values(state_at(entries, target)) == {"a": 40, "b": "three"}


def test_a_context_at_an_event_is_the_one_of_the_version_it_happened_at() -> None:
    entries = rewound()
    in_epoch_1 = event_entry("run-1", "run-1", "failed", now=1.0, epoch=1, version=4)
    in_epoch_2 = event_entry("run-1", "run-1", "retried", now=1.0, epoch=2, version=4)
    assert values(state_at([*entries, in_epoch_1], in_epoch_1)) == {"a": 4, "b": "three", "c": "only in epoch 1"}
    assert values(state_at([*entries, in_epoch_2], in_epoch_2)) == {"a": 40, "b": "three"}
    assert values(state_at(entries, event_entry("run-1", "run-1", "cancelled", now=1.0, version=0))) == {}


def test_a_context_at_an_entry_whose_first_entries_were_lost_is_incomplete() -> None:
    entries = [entry for entry in rewound() if entry.version != 1]
    target = next(entry for entry in entries if entry.id == "run-1@1.2")
    assert values(state_at(entries, target)) == {"a": 2}  # v1 is gone (pruned): what only it set is missing
    assert values(state_at(rewound(), target)) == {"a": 2, "b": "kept"}


def test_before_and_after_shows_each_change_from_the_values_of_its_lineage() -> None:
    entries = rewound()
    by_id = {entry.id: entry for entry in entries}
    # Before epoch 2's v4, "a" was epoch 1's v2 value (v3 is where the rewind went back to), not v4's.
    assert before_and_after(entries, by_id["run-1@2.4"]) == [
        {"name": "a", "op": "set", "sensitivity": "public", "before": 2, "existed": True, "after": 40},
    ]
    assert before_and_after(entries, by_id["run-1@1.5"]) == [
        {"name": "a", "op": "set", "sensitivity": "public", "before": 4, "existed": True, "after": 5},
        {"name": "b", "op": "delete", "sensitivity": "public", "before": "three", "existed": True, "after": None},
    ]
    assert before_and_after(entries, by_id["run-1@2.5"]) == [
        {"name": "d", "op": "set", "sensitivity": "public", "before": None, "existed": False, "after": "added in epoch 2"},
    ]


def test_before_and_after_masks_sensitive_values_on_both_sides() -> None:
    codec = Codec(keyring())
    first = created_entry(context({"token": TOKEN}, sensitivity={"token": "secret"}), codec=codec, now=1.0)
    base = context({"token": TOKEN}, sensitivity={"token": "secret"})
    working = committed(base)
    working.set_variable("token", "another-plain-token")
    second = commit_entry(working, 1, codec=codec, now=2.0)

    rows = before_and_after([first, second], second)
    assert rows == [{"name": "token", "op": "set", "sensitivity": "secret", "before": MASK, "existed": True, "after": MASK}]
    assert TOKEN not in json.dumps(rows) and "another-plain-token" not in json.dumps(rows)


def test_diff_gives_the_added_removed_and_changed_variables() -> None:
    entries = rewound()
    by_id = {entry.id: entry for entry in entries}
    rows = diff(state_at(entries, by_id["run-1@1.5"]), state_at(entries, by_id["run-1@2.5"]))
    assert rows == [
        {"name": "a", "change": "changed", "before": 5, "after": 40},
        {"name": "b", "change": "added", "before": None, "after": "three"},
        {"name": "c", "change": "removed", "before": "only in epoch 1", "after": None},
        {"name": "d", "change": "added", "before": None, "after": "added in epoch 2"},
    ]
    assert diff(state_at(entries, by_id["run-1@1.4"]), state_at(entries, by_id["run-1@1.4"])) == []
    # The same value set again by another entry is no difference for a value that is not masked.
    same = [made(1, 1, put("a", 1)), made(1, 2, put("a", 1))]
    assert diff(state_at(same, same[0]), state_at(same, same[1])) == []


def test_diff_tells_a_masked_value_changed_only_when_another_entry_set_it() -> None:
    codec = Codec(keyring())
    base = context({"token": TOKEN, "n": 1}, sensitivity={"token": "secret"})
    first = created_entry(base, codec=codec, now=1.0)
    other = committed(base)
    other.set_variable("n", 2)
    second = commit_entry(other, 1, codec=codec, now=2.0)
    again = committed(other)
    again.set_variable("token", TOKEN)  # the same value, sealed again: its ciphertext says nothing of it
    third = commit_entry(again, 2, codec=codec, now=3.0)
    entries = [first, second, third]
    at = {entry.version: state_at(entries, entry) for entry in entries}

    assert diff(at[1], at[2]) == [{"name": "n", "change": "changed", "before": 1, "after": 2}]  # token: set by v1 in both
    assert diff(at[2], at[3]) == [{"name": "token", "change": "changed", "before": MASK, "after": MASK}]


def test_diff_reports_a_value_made_more_sensitive_and_masks_it() -> None:
    base = context({"user": "alice"})
    first = created_entry(base, codec=Codec(), now=1.0)
    working = committed(base)
    working.raise_sensitivity("user", DataSensitivity.SECRET)
    second = commit_entry(working, 1, codec=Codec(), now=2.0)
    entries = [first, second]
    assert diff(state_at(entries, first), state_at(entries, second)) == [
        {"name": "user", "change": "changed", "before": "alice", "after": MASK},
    ]


# ---- the stored form --------------------------------------------------------------------------------


def test_an_entry_round_trips_through_json() -> None:
    codec = Codec(keyring())
    working = committed(context({"a": 1, "gone": 2}))
    working.set_variable("a", {"nested": [1, 2.5, None, "x"]})
    working.set_variable("token", TOKEN, sensitivity="secret")
    working.delete_variable("gone")
    entry = replace(
        commit_entry(working, 1, codec=codec, now=12.25, step_id="s1", worker="w-2", duration_s=0.25, attempt=2),
        note="a note", status="done",
    )
    event = event_entry("run-1", "run-1", "skipped", now=3.0, step_id="s9", note="gate closed")

    for original in (entry, event):
        raw = original.to_json()
        assert HistoryEntry.from_json(raw) == original
        assert HistoryEntry.from_json(raw.encode()) == original
        assert HistoryEntry.from_json(json.loads(raw)) == original
    assert open_change(HistoryEntry.from_json(entry.to_json()).changes[2], entry, codec) == TOKEN


def test_the_public_form_shows_every_field_with_the_duration() -> None:
    working = committed(context({}))
    working.set_variable("token", TOKEN, sensitivity="confidential")
    entry = commit_entry(working, 1, codec=Codec(keyring()), now=10.0, step_id="s1", duration_s=1.2345678)
    shown = entry.public()
    assert shown["duration_s"] == 1.234568
    assert shown["changes"] == [{"name": "token", "op": "set", "scope": "variables", "sensitivity": "confidential", "value": MASK}]
    assert {key: shown[key] for key in ("id", "run_id", "context_id", "kind", "step_id", "version", "previous")} == {
        "id": "run-1@1.2", "run_id": "run-1", "context_id": "run-1", "kind": STEP, "step_id": "s1", "version": 2, "previous": 1,
    }
    assert event_entry("run-1", "run-1", "failed", now=1.0).public()["duration_s"] is None
