"""Large values by reference (`state.blobs`) through the store, in memory and on the real tiers
with encryption keys: a value over ``value_ref_bytes`` is stored once whoever sets it, its contexts
(L2, L3, history) hold only the reference, a step reads the value itself, a secret one is sealed
where it is stored, and prune takes a blob with the last run that holds it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest

from state.blobs import REF, is_ref
from state.change_events import libpq_url
from state.models import DataSensitivity, RunContextInit, StateCacheConfig
from state.sealing import Keyring
from state.store import TieredStore
from tasks.changes import ContextView

BIG = os.urandom(300_000).hex()  # 600 KB of text: over the default 256 KiB
SECRET = "sk-" + os.urandom(200_000).hex()


@pytest.fixture(params=["memory", "servers"])
def store(request: pytest.FixtureRequest) -> Iterator[TieredStore]:
    if request.param == "memory":
        yield TieredStore.in_memory()
        return
    servers = request.getfixturevalue("servers")
    made = TieredStore.connect(
        servers.redis_url, request.getfixturevalue("database_url"), config=StateCacheConfig(),
        prefix=request.getfixturevalue("key_prefix"), keyring=Keyring.parse(Keyring.new_entry()),
    )
    yield made
    made.close()


def test_a_large_value_is_stored_once_and_its_contexts_hold_the_reference(store: TieredStore) -> None:
    root = store.create_context(RunContextInit(run_id="run-b", routine_id="r", variables={"doc": BIG, "n": 1}))
    assert is_ref(root.variables["doc"]) and root.variables["doc"]["size"] == len(BIG) + 2
    with store.edit("run-b") as working:
        working.set_variable("copy", BIG)  # the same value again: the same blob
    assert store.blobs.usage() == (1, len(BIG) + 2)
    stored = store.read_newest("run-b")
    assert stored.variables["copy"] == stored.variables["doc"]
    assert ContextView(stored, open_value=store.blobs.open).get("copy") == BIG
    fresh = TieredStore(store.l1.__class__(store.config), store.l2, store.l3, config=store.config, codec=store.codec)
    assert fresh.blobs.open(stored.variables["doc"]) == BIG  # another process opens it from L3
    assert store.write_behind.flush(["run-b"]) == 1
    assert is_ref(store.read_l3("run-b").variables["copy"])


def test_a_secret_large_value_is_sealed_where_it_is_stored(store: TieredStore, request: pytest.FixtureRequest) -> None:
    root = store.create_context(
        RunContextInit(run_id="run-s", routine_id="r", variables={"token": SECRET}, sensitivity_map={"token": DataSensitivity.SECRET})
    )
    view = ContextView(root, reads={"token"}, open_value=store.blobs.open)
    assert view.get("token") == SECRET and view.highest_read is DataSensitivity.SECRET
    if isinstance(store.l3, type(TieredStore.in_memory().l3)):
        return
    blob_id = store.read_l3("run-s").variables["token"][REF]
    assert SECRET[:40] not in blob_id
    with psycopg.connect(libpq_url(request.getfixturevalue("database_url"))) as conn:
        data = bytes(conn.execute("SELECT data FROM blobs WHERE blob_id = %s", (blob_id,)).fetchone()[0])
    assert b"$sealed" in data and SECRET[:40].encode() not in data
