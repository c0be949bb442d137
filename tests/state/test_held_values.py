"""A snapshot's large values held beside it in L3 (`state.tiers.postgres.held`): the pure split and
join, then on PostgreSQL with keys: a write sends only the values L3 lacks (an unchanged large
value's row is never written again), contexts and the history's creation entries read back whole,
a key rotation keeps them, and prune takes them with the run."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator

import psycopg
import pytest

from state.change_events import libpq_url
from state.detached import DETACH_BYTES
from state.models import DataSensitivity, RunContextInit, StateCacheConfig
from state.sealing import Keyring
from state.store import TieredStore
from state.tiers.data import RunRow
from state.tiers.postgres.held import HELD, joined, split

LARGE = os.urandom(40_000).hex()  # 80 KB: over DETACH_BYTES, under the reference threshold
OTHER = os.urandom(30_000).hex()


# ---- pure: split and join --------------------------------------------------------------------


def document(**variables) -> dict:
    return {"context_id": "c", "variables": variables, "intermediate": {}, "inherited": {"parent_doc": LARGE}}


def test_split_holds_large_plain_values_and_join_gives_the_document_back() -> None:
    original = document(doc=LARGE, n=1, note="short", nested={"rows": [LARGE[:20_000]] * 2})
    stored, values = split(json.loads(json.dumps(original)))
    assert stored["variables"]["n"] == 1 and stored["variables"]["note"] == "short"
    assert set(stored[HELD]) == {"variables", "inherited"}
    assert set(stored[HELD]["variables"]) == {"doc", "nested"}
    assert len(values) == 2  # the inherited copy and the variable are one value, held once
    assert len(json.dumps(stored)) < 1_000
    assert joined(stored, {key: json.loads(text) for key, text in values.items()}) == original


def test_sealed_and_small_values_stay_in_the_document_and_a_lookalike_of_a_mark_is_a_value() -> None:
    lookalike = {HELD: "0" * 32, "size": 5}
    sealed = {"$sealed": "v1.k." + "x" * (DETACH_BYTES * 2)}
    original = {"variables": {"token": sealed, "shaped": lookalike, "edge": "y" * (DETACH_BYTES - 2)}}
    stored, values = split(json.loads(json.dumps(original)))
    assert values == {} and HELD not in stored
    assert joined(stored, {}) == original


# ---- on PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def store(servers, database_url: str, key_prefix: str) -> Iterator[TieredStore]:
    made = TieredStore.connect(
        servers.redis_url, database_url, config=StateCacheConfig(), prefix=key_prefix, keyring=Keyring.parse(Keyring.new_entry()),
    )
    yield made
    made.close()


def rows(database_url: str) -> dict[str, int]:
    """The held values' rows: digest -> the transaction that wrote the row (xmin)."""
    with psycopg.connect(libpq_url(database_url)) as conn:
        return {digest: int(xmin) for digest, xmin in conn.execute("SELECT digest, xmin::text::bigint FROM context_values")}


def wal_bytes(database_url: str) -> int:
    with psycopg.connect(libpq_url(database_url)) as conn:
        return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()[0])


def snapshot_text(database_url: str, context_id: str) -> str:
    with psycopg.connect(libpq_url(database_url)) as conn:
        return conn.execute("SELECT document::text FROM context_snapshots WHERE context_id = %s", (context_id,)).fetchone()[0]


def begin(store: TieredStore, run_id: str, variables: dict, **init) -> None:
    run = RunRow(run_id=run_id, routine_name="r", routine_version=1, root_context_id=run_id, status="running")
    store.create_context(RunContextInit(run_id=run_id, routine_id="r", variables=variables, **init), run=run)


def test_a_write_sends_only_the_large_values_l3_lacks(store: TieredStore, database_url: str) -> None:
    begin(store, "run-h", {"doc": LARGE, "n": 0})
    first = rows(database_url)
    assert len(first) == 1
    assert LARGE not in snapshot_text(database_url, "run-h")
    before = wal_bytes(database_url)
    for n in range(1, 4):
        with store.edit("run-h") as working:
            working.set_variable("n", n)
        store.flush("run-h")
    assert rows(database_url) == first  # the same row, never written again
    assert wal_bytes(database_url) - before < len(LARGE) // 2  # three flushes wrote less than the value once
    assert store.l3.get_context("run-h").variables == {"doc": LARGE, "n": 3}

    with store.edit("run-h") as working:
        working.set_variable("doc", OTHER)
    store.flush("run-h")
    assert len(rows(database_url)) == 2
    assert store.l3.get_context("run-h").variables == {"doc": OTHER, "n": 3}


def test_a_child_shares_its_parents_row_and_the_creation_entry_reads_back_whole(store: TieredStore, database_url: str) -> None:
    begin(store, "run-c", {"doc": LARGE})
    parent = store.get_context("run-c")
    store.create_context(parent.create_child("sub", inherit=["doc"], context_id="run-c/child"))
    assert len(rows(database_url)) == 1
    assert store.l3.get_context("run-c/child").inherited["doc"] == LARGE
    with psycopg.connect(libpq_url(database_url)) as conn:
        stored = " ".join(text for (text,) in conn.execute("SELECT entry::text FROM step_history WHERE run_id = 'run-c'"))
    assert LARGE not in stored
    entries, _ = store.l3.run_history("run-c")
    created = [entry for entry in entries if entry.kind == "created" and entry.context_id == "run-c"]
    assert [change.value for change in created[0].changes if change.name == "doc"] == [LARGE]


def test_prune_takes_the_runs_values_and_a_key_rotation_keeps_them(store: TieredStore, database_url: str, servers, key_prefix: str) -> None:
    token = "sk-" + os.urandom(20_000).hex()  # secret and large: sealed in the document, not held
    begin(store, "run-k", {"doc": LARGE, "token": token}, sensitivity_map={"token": DataSensitivity.SECRET})
    assert token not in snapshot_text(database_url, "run-k") and len(rows(database_url)) == 1
    old_id, old_key = store.codec.keyring.keys[0]
    rotated = Keyring.parse(f"{Keyring.new_entry()},{old_id}:{base64.b64encode(old_key).decode()}")
    with_both = TieredStore.connect(servers.redis_url, database_url, config=StateCacheConfig(), prefix=key_prefix, keyring=rotated)
    try:
        with_both.maintenance.rotate_keys(rotated)
        assert with_both.l3.get_context("run-k").variables == {"doc": LARGE, "token": token}
    finally:
        with_both.close()

    begin(store, "run-kept", {"doc": LARGE})
    assert store.ledger.finish_run("run-k", status="succeeded", error=None, meta={}, contexts=[], exports=[])
    store.maintenance.prune(0.0)
    assert len(rows(database_url)) == 1  # run-kept's own row of the same value
    assert store.l3.get_context("run-kept").variables == {"doc": LARGE}
