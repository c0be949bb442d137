"""A run's history in the real tiers: L2's history lists (the in-memory twin, Redis and a Redis
Cluster), L3's step_history (the twin and PostgreSQL), and a TieredStore moving entries from one
to the other (on Redis and PostgreSQL with encryption keys, and in memory).

The `l2` and `l3` fixtures are those of `test_tier_contracts.py`, repeated here: a test file
imports no other test file (`tests/test_architecture.py`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from state.change_events import libpq_url
from state.errors import VersionConflict
from state.history import CREATED, EDIT, EVENT, HistoryEntry, commit_id, event_entry, open_change, state_at
from state.models import RunContext, RunContextInit, StateCacheConfig
from state.sealing import Keyring, is_sealed
from state.store import TieredStore
from state.tiers.contracts import L2Tier, L3Tier
from state.tiers.data import CommitRequest, CommitStatus, RunRow, watch_message
from state.tiers.memory import MemoryL2, MemoryL3
from state.tiers.postgres import PostgresTier
from state.tiers.redis import RedisTier

T0 = 1_000.0  # "now" of the L2 tests
TOKEN = "tok-51d0-plain-secret"
PIN = "pin-8675-plain"
CARD = "4111-2222-plain-card"


# ---- helpers ----------------------------------------------------------------------------------------


def keyring() -> Keyring:
    return Keyring.parse(Keyring.new_entry())


def context(context_id: str = "run-1", version: int = 1, **variables: Any) -> RunContext:
    """A context at ``version``; its variables default to {"n": version}."""
    ctx = RunContext.from_init(
        RunContextInit(run_id=context_id.split("/")[0], routine_id="r", context_id=context_id, variables=variables or {"n": version})
    )
    ctx.version = version
    return ctx


def entry(context_id: str = "run-1", version: int = 2, *, at: float = T0, **fields: Any) -> HistoryEntry:
    """The entry of a version (an edit that set "n"), or with ``kind``/``id`` given, anything else."""
    values: dict[str, Any] = dict(
        id=commit_id(context_id, 1, version), run_id=context_id.split("/")[0], context_id=context_id, kind=EDIT,
        version=version, previous=version - 1, at=at,
    )
    return HistoryEntry(**{**values, **fields})


def event(context_id: str = "run-1", status: str = "retried", at: float = T0) -> HistoryEntry:
    return event_entry(context_id.split("/")[0], context_id, status, now=at)


def committing(ctx: RunContext, expected: int, history: HistoryEntry | None, **fields: Any) -> CommitRequest:
    return CommitRequest(ctx, expected, history=None if history is None else history.to_json(), **fields)


def waiting(l2: L2Tier, context_id: str = "run-1") -> list[str]:
    """The ids of a context's entries waiting in L2, oldest first."""
    return [HistoryEntry.from_json(raw).id for raw in l2.history_lists([context_id])[context_id]]


def push(l2: L2Tier, item: HistoryEntry) -> None:
    l2.push_history(item.context_id, item.to_json(), watch_message(item.run_id, item.context_id, item.version))


def ids(entries: list[HistoryEntry]) -> list[str]:
    return [e.id for e in entries]


def stored(l3: L3Tier, run_id: str = "run-1") -> list[HistoryEntry]:
    """A run's entries L3 holds, in the order it stored them."""
    return l3.run_history(run_id)[0]


def run_row(run_id: str = "run-1") -> RunRow:
    return RunRow(run_id=run_id, routine_name="greet", routine_version=1, root_context_id=run_id, status="running")


def finish(l3: L3Tier, run_id: str = "run-1", **fields: Any) -> bool:
    values: dict[str, Any] = dict(status="succeeded", error=None, meta={}, contexts=[], exports=[])
    fields["history"] = [item.to_json() for item in fields.get("history", [])]  # as the L2 lists hold them
    return l3.finish_run(run_id, **{**values, **fields})


def create(store: TieredStore, context_id: str = "run-1", *, run: bool = False, sensitivity: dict[str, str] | None = None, **variables: Any) -> str:
    init = RunContextInit(
        run_id=context_id.split("/")[0], routine_id="r", context_id=context_id, variables=variables or {"n": 1},
        sensitivity_map=sensitivity or {},
    )
    return store.create_context(init, run=run_row(init.run_id) if run else None).context_id


def edit(store: TieredStore, context_id: str, **values: Any) -> None:
    """One edit (one version): each value set, or deleted where it is None."""
    with store.edit(context_id) as working:
        for name, value in values.items():
            if value is None:
                working.delete_variable(name)
            else:
                working.set_variable(name, value)


def opened(store: TieredStore, entries: list[HistoryEntry], target: HistoryEntry) -> dict[str, dict[str, Any]]:
    """The context at ``target`` replayed from ``entries``, its sealed values opened, by scope."""
    state = state_at(entries, target)
    by_id = {e.id: e for e in entries}
    scopes: dict[str, dict[str, Any]] = {"variables": {}, "intermediate": {}}
    for name, change in state.values.items():
        scopes[change.scope][name] = open_change(change, by_id[state.set_by[name]], store.codec)
    return scopes


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def cache_config() -> StateCacheConfig:
    return StateCacheConfig(write_behind_debounce_s=5.0, write_behind_max_delay_s=12.0)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def l2(request: pytest.FixtureRequest, cache_config: StateCacheConfig) -> Iterator[L2Tier]:
    if request.param == "memory":
        yield MemoryL2(prefix=f"rctxtest:{uuid.uuid4().hex[:12]}", config=cache_config)
        return
    if request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url
        tier = RedisTier.from_url(url, prefix=f"rctxtest:{uuid.uuid4().hex[:12]}", config=cache_config)
        assert tier.cluster
    else:
        servers = request.getfixturevalue("servers")
        tier = RedisTier.from_url(servers.redis_url, prefix=request.getfixturevalue("key_prefix"), config=cache_config)
        assert not tier.cluster
    yield tier
    tier.close()


@pytest.fixture(params=["memory", "postgres"])
def l3(request: pytest.FixtureRequest, cache_config: StateCacheConfig) -> Iterator[L3Tier]:
    if request.param == "memory":
        yield MemoryL3()
        return
    tier = PostgresTier.from_url(request.getfixturevalue("database_url"), config=cache_config)
    yield tier
    tier.close()


@pytest.fixture(params=["memory", "servers"])
def store(request: pytest.FixtureRequest, cache_config: StateCacheConfig) -> Iterator[TieredStore]:
    """A store in memory, or on Redis and PostgreSQL with encryption keys (sensitive values sealed)."""
    if request.param == "memory":
        yield TieredStore.in_memory(config=cache_config)
        return
    servers = request.getfixturevalue("servers")
    database_url, prefix = request.getfixturevalue("database_url"), request.getfixturevalue("key_prefix")
    made = TieredStore.connect(servers.redis_url, database_url, config=cache_config, prefix=prefix, keyring=keyring())
    yield made
    made.close()


@pytest.fixture
def sealed_store(servers, database_url: str, key_prefix: str, cache_config: StateCacheConfig) -> Iterator[TieredStore]:
    made = TieredStore.connect(servers.redis_url, database_url, config=cache_config, prefix=key_prefix, keyring=keyring())
    yield made
    made.close()


# ==== L2: history lists (MemoryL2 | RedisTier | RedisTier on a cluster) ================================


def test_l2_a_commit_pushes_its_entry_and_a_refused_one_pushes_nothing(l2: L2Tier) -> None:
    first, second, third = entry(version=1, kind=CREATED, previous=0), entry(version=2), entry(version=3, step_id="s1")
    assert l2.commit(committing(context(version=1), 0, first), now=T0).status is CommitStatus.COMMITTED
    assert l2.commit(committing(context(version=2), 1, second), now=T0).status is CommitStatus.COMMITTED
    assert l2.commit(committing(context(version=3), 2, third, step_id="s1"), now=T0).status is CommitStatus.COMMITTED

    refused = {
        "stale": committing(context(version=2, n="late"), 1, entry(version=2, note="stale")),
        "other lineage": committing(context(version=4), 3, entry(version=4, note="other"), expected_epoch=2),
        "applied already": committing(context(version=4), 3, entry(version=4, note="again"), step_id="s1"),
    }
    statuses = {name: l2.commit(request, now=T0).status for name, request in refused.items()}
    assert statuses == {
        "stale": CommitStatus.STALE, "other lineage": CommitStatus.OTHER_LINEAGE, "applied already": CommitStatus.ALREADY_APPLIED,
    }
    no_entry = l2.commit(committing(context("run-2", version=2), 1, entry("run-2", version=2)), now=T0)
    assert no_entry.status is CommitStatus.NO_ENTRY
    assert l2.commit(committing(context(version=4), 3, None), now=T0).status is CommitStatus.COMMITTED  # carries none

    assert l2.history_lists(["run-1", "run-2"]) == {"run-1": [first.to_json(), second.to_json(), third.to_json()], "run-2": []}


def test_l2_push_history_appends_to_what_commits_pushed(l2: L2Tier) -> None:
    l2.commit(committing(context(version=1), 0, entry(version=1, kind=CREATED, previous=0)), now=T0)
    retried = event(status="retried")
    push(l2, retried)
    l2.commit(committing(context(version=2), 1, entry(version=2)), now=T0)
    skipped = event("run-1/gone", status="skipped")  # a context L2 holds no entry of
    push(l2, skipped)

    assert waiting(l2) == ["run-1@1.1", retried.id, "run-1@1.2"]
    assert waiting(l2, "run-1/gone") == [skipped.id]


def test_l2_mark_flushed_takes_the_entries_up_to_the_last_one_taken(l2: L2Tier) -> None:
    for version in (1, 2, 3):
        l2.commit(committing(context(version=version), version - 1, entry(version=version)), now=T0)
    taken = l2.history_lists(["run-1"])["run-1"][-1]  # the last entry a flush read
    late = event()  # pushed after the flush read the list: it must wait for the next one
    beside = event("run-1/sub")
    push(l2, late)
    push(l2, beside)

    l2.mark_flushed("run-1", 3, now=T0 + 1, history_taken=taken)
    assert waiting(l2) == [late.id]
    l2.mark_flushed("run-1", 3, now=T0 + 1)  # took none
    assert waiting(l2) == [late.id]
    assert waiting(l2, "run-1/sub") == [beside.id]  # another context's list is its own
    l2.mark_flushed("run-1", 3, now=T0 + 1, history_taken=taken)  # taken already by another write: nothing more
    assert waiting(l2) == [late.id]
    l2.mark_flushed("run-1", 3, now=T0 + 1, history_taken=late.to_json())
    assert waiting(l2) == []


def test_l2_history_lists_of_many_contexts_at_once(l2: L2Tier) -> None:
    context_ids = ["run-1", "run-2", "run-3/a", "run-3/b"]  # on different shards (and cluster nodes)
    for context_id in context_ids:
        l2.commit(committing(context(context_id, 1), 0, entry(context_id, 1)), now=T0)
        push(l2, event(context_id))
    lists = l2.history_lists(context_ids + ["nothing"])
    assert list(lists) == context_ids + ["nothing"]
    assert {cid: [HistoryEntry.from_json(raw).context_id for raw in raws] for cid, raws in lists.items()} == {
        **{cid: [cid, cid] for cid in context_ids}, "nothing": [],
    }
    assert l2.history_lists([]) == {}


# ==== L3: step_history (MemoryL3 | PostgresTier) ========================================================


def test_l3_write_contexts_stores_each_entry_once(l3: L3Tier) -> None:
    l3.create_context(context(version=1))
    now = time.time()
    flushed = [entry(version=2, at=now + 1), entry(version=3, at=now + 2, step_id="s3", worker="w-1"), event(at=now + 3)]

    assert l3.write_contexts([context(version=3)], [e.to_json() for e in flushed]) == 1
    assert l3.write_contexts([context(version=3)], [e.to_json() for e in flushed]) == 0  # the same flush made again

    held = stored(l3)
    assert ids(held) == ["run-1@1.1", "run-1@1.2", "run-1@1.3", flushed[2].id]
    assert held[1:] == flushed
    assert l3.history_count("run-1") == 4


def test_l3_write_contexts_stores_the_entries_even_when_no_context_is_newer(l3: L3Tier) -> None:
    l3.create_context(context(version=3))
    late = entry(version=3, at=time.time() + 1)  # e.g. written by a finish first, then by a flush
    assert l3.write_contexts([context(version=3)], [late.to_json()]) == 0
    assert ids(stored(l3)) == ["run-1@1.1", late.id]


def test_l3_add_history_leaves_a_stored_entry_as_it_is(l3: L3Tier) -> None:
    first = entry(version=2, note="first")
    l3.add_history([first])
    other = entry(version=3, at=T0 + 1)
    l3.add_history([replace(first, note="second"), other])
    assert stored(l3) == [first, other]


def test_l3_run_history_is_a_runs_entries_in_the_order_stored(l3: L3Tier) -> None:
    batch = [entry("run-1/sub", 2, at=T0 + 3), entry("run-2", 2, at=T0 + 1), entry("run-1", 2, at=T0 + 2), event("run-1/sub", at=T0)]
    l3.add_history(batch)
    l3.add_history([entry("run-1", 3, at=T0 + 1)])
    assert ids(stored(l3)) == ["run-1/sub@1.2", "run-1@1.2", batch[3].id, "run-1@1.3"]
    assert ids(stored(l3, "run-2")) == ["run-2@1.2"]
    assert (l3.history_count("run-1"), l3.history_count("run-2"), l3.history_count("run-3")) == (4, 1, 0)
    assert l3.run_history("run-3")[0] == []


def test_l3_run_history_after_a_mark_gives_only_what_was_stored_since(l3: L3Tier) -> None:
    l3.add_history([entry(version=2), entry("run-1/sub", 2)])
    first, mark = l3.run_history("run-1")
    assert ids(first) == ["run-1@1.2", "run-1/sub@1.2"]
    assert l3.run_history("run-1", after=mark) == ([], mark)

    l3.add_history([entry("run-2", 2)])  # another run's
    l3.add_history([entry(version=2, note="again"), entry(version=3), event("run-1/sub")])  # the first is stored already
    new, later = l3.run_history("run-1", after=mark)
    assert ids(new) == ["run-1@1.3", new[1].id] and new[1].kind == EVENT
    assert later > mark
    assert l3.run_history("run-1", after=later)[0] == []
    assert ids(l3.run_history("run-1", after=0)[0]) == ids(first + new)


def test_l3_creating_contexts_records_what_each_was_created_with(l3: L3Tier) -> None:
    l3.create_run(run_row(), context(version=1, greeting="hello"))
    l3.create_context(context("run-1/a", 1, x=1))
    assert l3.create_contexts([context("run-1/b", 1, y=[1, 2]), context("run-1/a", 1, x="not this")]) == 1
    with pytest.raises(VersionConflict):
        l3.create_context(context("run-1/a", 1, x="nor this"))

    created = {e.context_id: e for e in stored(l3)}
    assert l3.history_count("run-1") == 3
    assert {cid: (e.id, e.kind, e.version, e.previous) for cid, e in created.items()} == {
        "run-1": ("run-1@1.1", CREATED, 1, 0), "run-1/a": ("run-1/a@1.1", CREATED, 1, 0), "run-1/b": ("run-1/b@1.1", CREATED, 1, 0),
    }
    assert {cid: [(c.name, c.op, c.value) for c in e.changes] for cid, e in created.items()} == {
        "run-1": [("greeting", "set", "hello")], "run-1/a": [("x", "set", 1)], "run-1/b": [("y", "set", [1, 2])],
    }


def test_l3_finish_run_stores_its_history_and_a_refused_finish_stores_none(l3: L3Tier) -> None:
    l3.create_run(run_row(), context(version=1))
    now = time.time()
    last, end = entry(version=2, at=now + 1), event(status="succeeded", at=now + 2)
    assert finish(l3, contexts=[context(version=2)], history=[last, end]) is True
    assert finish(l3, status="failed", history=[event(status="failed", at=now + 3)]) is False
    assert ids(stored(l3)) == ["run-1@1.1", last.id, end.id]


def test_l3_prune_removes_a_pruned_runs_history(l3: L3Tier) -> None:
    l3.create_run(run_row("run-old"), context("run-old", 1))
    l3.create_context(context("run-old/sub", 1))
    l3.add_history([event("run-old/gone")])  # of a context that has no snapshot
    assert finish(l3, "run-old", contexts=[context("run-old", 2)], history=[entry("run-old", 2), event("run-old")]) is True
    l3.create_run(run_row("run-live"), context("run-live", 1))
    l3.add_history([entry("run-live", 2)])
    assert l3.history_count("run-old") == 5
    time.sleep(0.05)  # the point: real time passes, on the clock that decides what is old (PostgreSQL's now())

    assert set(l3.prune_runs(0.01)) == {"run-old"}
    assert l3.history_count("run-old") == 0 and stored(l3, "run-old") == []
    assert sorted(ids(stored(l3, "run-live"))) == ["run-live@1.1", "run-live@1.2"]


def test_l3_a_reader_that_holds_entries_gets_only_those_it_lacks_whatever_was_pruned_meanwhile(l3: L3Tier) -> None:
    l3.create_run(run_row("run-old"), context("run-old", 1))
    assert finish(l3, "run-old", contexts=[context("run-old", 2)]) is True
    l3.create_run(run_row("run-1"), context("run-1", 1))
    held, mark = l3.run_history("run-1")
    time.sleep(0.05)  # real time passes on PostgreSQL's clock, which decides what is old
    assert set(l3.prune_runs(0.01)) == {"run-old"}
    later = [entry("run-1", 2), entry("run-1", 3)]
    l3.add_history(later)

    new, newer_mark = l3.run_history("run-1", after=mark)
    assert ids(new) == ids(later) and newer_mark > mark
    # Asked again from an older mark, with the ids it holds: nothing it has is read twice.
    again, _ = l3.run_history("run-1", after=0, known=frozenset(ids(held + new)))
    assert again == []
    missing, _ = l3.run_history("run-1", after=0, known=frozenset(ids(held)))
    assert ids(missing) == ids(later)


def test_l3_creating_contexts_again_records_no_second_creation(l3: L3Tier) -> None:
    l3.create_run(run_row("run-1"), context("run-1", 1))
    assert l3.create_contexts([context("run-1/a", 1), context("run-1/b", 1)]) == 2
    again = context("run-1/a", 1, greeting="never stored")
    again.epoch = 2
    assert l3.create_contexts([again, context("run-1/c", 1)]) == 1
    created = [e for e in stored(l3) if e.kind == "created"]
    assert sorted(e.context_id for e in created) == ["run-1", "run-1/a", "run-1/b", "run-1/c"]


# ==== through a TieredStore (in memory | Redis and PostgreSQL, with keys) ================================


def test_edits_reach_l3_with_the_flush_and_leave_the_l2_list_empty(store: TieredStore) -> None:
    context_id = create(store, n=1)
    edit(store, context_id, n=2)
    edit(store, context_id, greeting="hi", n=None)
    pending = [HistoryEntry.from_json(raw) for raw in store.l2.history_lists([context_id])[context_id]]
    assert [(e.id, e.kind, e.previous) for e in pending] == [("run-1@1.2", EDIT, 1), ("run-1@1.3", EDIT, 2)]
    assert ids(stored(store.l3)) == ["run-1@1.1"]  # the write-behind has not run

    assert store.flush(context_id) is True
    assert stored(store.l3)[1:] == pending
    assert store.l2.history_lists([context_id]) == {context_id: []}
    assert store.flush(context_id) is False
    assert store.l3.history_count("run-1") == 3


def test_replaying_to_the_newest_entry_gives_the_l3_snapshot(store: TieredStore) -> None:
    context_id = create(store, run=True, sensitivity={"pin": "secret"}, user="alice", pin=PIN, items=[1])
    edit(store, context_id, user="bob", items=[1, 2])
    with store.edit(context_id) as working:
        working.set_variable("token", TOKEN, sensitivity="secret")
        working.set_variable("card", CARD, sensitivity="confidential", scope="intermediate")
        working.delete_variable("items")
    edit(store, context_id, user="carol")
    store.flush(context_id)

    entries = stored(store.l3)
    newest = max(entries, key=lambda e: e.version)
    snapshot = store.read_l3(context_id)
    assert (newest.version, snapshot.version) == (4, 4)
    assert opened(store, entries, newest) == {"variables": snapshot.variables, "intermediate": snapshot.intermediate}
    assert snapshot.variables == {"user": "carol", "pin": PIN, "token": TOKEN}
    assert {n: c.sensitivity for n, c in state_at(entries, newest).values.items()} == {
        n: snapshot.sensitivity_of(n).value for n in (*snapshot.variables, *snapshot.intermediate)
    }


def test_a_sensitive_value_is_sealed_in_the_redis_list_and_in_step_history(sealed_store: TieredStore, database_url: str) -> None:
    store = sealed_store
    context_id = create(store, sensitivity={"pin": "secret"}, user="alice", pin=PIN)
    with store.edit(context_id) as working:
        working.set_variable("token", TOKEN, sensitivity="secret")
        working.set_variable("card", CARD, sensitivity="confidential", scope="intermediate")
    raw = b"".join(store.l2.client.lrange(store.l2.keys.history(context_id), 0, -1))
    assert b"$sealed" in raw and TOKEN.encode() not in raw and CARD.encode() not in raw

    assert store.flush(context_id) is True
    with psycopg.connect(libpq_url(database_url)) as conn:
        rows = conn.execute("SELECT entry_id, entry::text FROM step_history ORDER BY entry_id").fetchall()
    assert [entry_id for entry_id, _ in rows] == ["run-1@1.1", "run-1@1.2"]
    for _, document in rows:
        assert "$sealed" in document and TOKEN not in document and CARD not in document and PIN not in document

    entries = store.history.of_run("run-1")
    sealed = {c.name: c for e in entries for c in e.changes if c.sensitivity != "public"}
    assert all(is_sealed(c.value) for c in sealed.values())
    assert opened(store, entries, entries[-1]) == {
        "variables": {"user": "alice", "pin": PIN, "token": TOKEN}, "intermediate": {"card": CARD},
    }


def test_of_run_merges_l3_and_the_entries_waiting_in_l2_each_once(store: TieredStore) -> None:
    root = create(store, n=1)
    child = create(store, "run-1/child", x=1)
    edit(store, root, n=2)
    store.flush(root)
    edit(store, root, n=3)
    edit(store, child, x=2)
    store.history.event("run-1", root, "retried", step_id="s3", epoch=1, version=3)
    retried = HistoryEntry.from_json(store.l2.history_lists([root])[root][-1])
    assert retried.kind == EVENT

    assert ids(store.history.of_run("run-1")) == ["run-1@1.1", "run-1/child@1.1", "run-1@1.2"]  # L3 only
    merged = ["run-1@1.1", "run-1/child@1.1", "run-1@1.2", "run-1@1.3", "run-1/child@1.2", retried.id]
    assert ids(store.history.of_run("run-1", context_ids=[root, child])) == merged
    assert "run-1/child@1.2" not in ids(store.history.of_run("run-1", context_ids=[root]))  # its list was not asked for
    # A flush that wrote L3 but died before taking the entries off the list: each is still shown once.
    pending = store.history.waiting([root, child])
    store.l3.add_history(pending)
    assert ids(store.history.of_run("run-1", context_ids=[root, child])) == merged


def test_finishing_a_run_moves_its_waiting_entries_and_its_end_to_l3(store: TieredStore) -> None:
    context_id = create(store, run=True, n=1)
    edit(store, context_id, n=2)
    assert store.ledger.finish_run(
        "run-1", status="succeeded", error=None, meta={}, contexts=[store.get_context(context_id)], exports=[]
    ) is True
    held = stored(store.l3)
    assert [(e.id, e.kind, e.status, e.version) for e in held[:2]] == [("run-1@1.1", CREATED, "done", 1), ("run-1@1.2", EDIT, "done", 2)]
    assert [(e.kind, e.status, e.version) for e in held[2:]] == [(EVENT, "succeeded", 2)]
    assert store.l2.history_lists([context_id]) == {context_id: []}


def test_a_rewind_is_recorded_and_the_new_epoch_replays_from_where_it_went_back(store: TieredStore) -> None:
    context_id = create(store, run=True, a=1)
    edit(store, context_id, a=2)
    store.flush(context_id)  # L3 holds v2
    edit(store, context_id, a=3)  # v3 of epoch 1: lost with L2's entry
    store.l2.evict_context(context_id)
    (rebuilt,) = store.rewinds.rebuild_lineage("run-1", 1)
    assert (rebuilt.epoch, rebuilt.version) == (2, 2)
    edit(store, context_id, a=30, b="new")  # v3 of epoch 2
    store.flush(context_id)

    entries = store.history.of_run("run-1", context_ids=[context_id])
    by_id = {e.id: e for e in entries}
    rewound = [e for e in entries if e.status == "rewound"]
    assert [(e.kind, e.epoch) for e in rewound] == [(EVENT, 2)]
    assert {"run-1@1.3", "run-1@2.3"} <= set(by_id)
    assert opened(store, entries, by_id["run-1@2.3"])["variables"] == {"a": 30, "b": "new"} == store.read_l3(context_id).variables
    assert opened(store, entries, by_id["run-1@1.3"])["variables"] == {"a": 3}
