"""Large values by reference (`state.blobs`) through the store, in memory and on the real tiers
with encryption keys: a value over ``value_ref_bytes`` is stored once whoever sets it, its contexts
(L2, L3, history) hold only the reference, a step reads the value itself, a secret one is sealed
where it is stored, and prune takes a blob with the last run that holds it."""

from __future__ import annotations

import base64
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


@pytest.fixture(params=["memory", "servers", "servers+s3"])
def store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[TieredStore]:
    """In memory; on Redis and PostgreSQL with keys, blobs in L3; the same, blobs in an S3 emulator."""
    if request.param == "memory":
        yield TieredStore.in_memory()
        return
    blob_url = ""
    if request.param == "servers+s3":
        s3 = request.getfixturevalue("s3_server")
        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)
        blob_url = s3.url()
    servers = request.getfixturevalue("servers")
    made = TieredStore.connect(
        servers.redis_url, request.getfixturevalue("database_url"), config=StateCacheConfig(),
        prefix=request.getfixturevalue("key_prefix"), keyring=Keyring.parse(Keyring.new_entry()), blob_url=blob_url,
    )
    yield made
    made.close()


def _stored(store: TieredStore, request: pytest.FixtureRequest, blob_id: str) -> bytes:
    """A blob's data where it is kept: L3's table, or the object store."""
    if store.blobs.objects is not None:
        return request.getfixturevalue("s3_server").objects()[f"blobs/{blob_id}"]
    with psycopg.connect(libpq_url(request.getfixturevalue("database_url"))) as conn:
        return bytes(conn.execute("SELECT data FROM blobs WHERE blob_id = %s", (blob_id,)).fetchone()[0])


def test_a_large_value_is_stored_once_and_its_contexts_hold_the_reference(store: TieredStore) -> None:
    root = store.create_context(RunContextInit(run_id="run-b", routine_id="r", variables={"doc": BIG, "n": 1}))
    assert is_ref(root.variables["doc"]) and root.variables["doc"]["size"] == len(BIG) + 2
    with store.edit("run-b") as working:
        working.set_variable("copy", BIG)  # the same value again: the same blob
    assert store.blobs.usage() == (1, len(BIG) + 2)
    stored = store.read_newest("run-b")
    assert stored.variables["copy"] == stored.variables["doc"]
    assert ContextView(stored, open_value=store.blobs.open).get("copy") == BIG
    fresh = TieredStore(store.l1.__class__(store.config), store.l2, store.l3, config=store.config, codec=store.codec, objects=store.blobs.objects)
    assert fresh.blobs.open(stored.variables["doc"]) == BIG  # another process opens it from L3
    assert store.write_behind.flush(["run-b"]) == 1
    assert is_ref(store.read_l3("run-b").variables["copy"])


def test_a_secret_large_value_is_sealed_where_it_is_stored(store: TieredStore, request: pytest.FixtureRequest) -> None:
    root = store.create_context(
        RunContextInit(run_id="run-s", routine_id="r", variables={"token": SECRET}, sensitivity_map={"token": DataSensitivity.SECRET})
    )
    view = ContextView(root, reads={"token"}, open_value=store.blobs.open)
    assert view.get("token") == SECRET and view.highest_read is DataSensitivity.SECRET
    if not hasattr(store.l3, "engine"):  # the in-memory twin: no keys, nothing sealed
        return
    blob_id = store.read_l3("run-s").variables["token"][REF]
    assert SECRET[:40] not in blob_id
    data = _stored(store, request, blob_id)
    assert b"$sealed" in data and SECRET[:40].encode() not in data


def test_prune_takes_a_blob_with_the_last_run_that_holds_it(store: TieredStore, request: pytest.FixtureRequest) -> None:
    from state.tiers.data import RunRow

    for run_id in ("run-p1", "run-p2"):
        root = RunContext_of(run_id, {"doc": BIG})
        store.create_context(root, run=RunRow(run_id=run_id, routine_name="r", routine_version=1, root_context_id=run_id, status="running"))
    assert store.blobs.usage() == (1, len(BIG) + 2)
    assert store.ledger.finish_run("run-p1", status="succeeded", error=None, meta={}, contexts=[], exports=[])
    store.maintenance.prune(0.0)
    assert store.blobs.usage()[0] == 1  # run-p2 holds it still
    assert store.ledger.finish_run("run-p2", status="succeeded", error=None, meta={}, contexts=[], exports=[])
    store.maintenance.prune(0.0)
    assert store.blobs.usage() == (0, 0)
    if store.blobs.objects is not None:
        assert store.blobs.collect(grace_s=0) == 1 and request.getfixturevalue("s3_server").objects() == {}


def RunContext_of(run_id: str, variables: dict) -> RunContextInit:
    return RunContextInit(run_id=run_id, routine_id="r", variables=variables)


def test_a_key_rotation_seals_stored_blobs_again(store: TieredStore, request: pytest.FixtureRequest) -> None:
    if not hasattr(store.l3, "engine"):
        pytest.skip("the in-memory twin seals nothing")
    root = store.create_context(
        RunContextInit(run_id="run-k", routine_id="r", variables={"token": SECRET}, sensitivity_map={"token": DataSensitivity.SECRET})
    )
    reference = root.variables["token"]
    old_id, old_key = store.codec.keyring.keys[0]
    rotated = Keyring.parse(f"{Keyring.new_entry()},{old_id}:{base64.b64encode(old_key).decode()}")

    def on_the_same_servers(keyring: Keyring) -> TieredStore:
        return TieredStore.connect(
            request.getfixturevalue("servers").redis_url, request.getfixturevalue("database_url"), config=StateCacheConfig(),
            prefix=request.getfixturevalue("key_prefix"), keyring=keyring,
            blob_url=request.getfixturevalue("s3_server").url() if store.blobs.objects is not None else "",
        )

    with_both = on_the_same_servers(rotated)
    with_both.maintenance.rotate_keys(rotated)
    with_both.close()
    newest_only = on_the_same_servers(Keyring(rotated.keys[:1]))
    try:
        assert newest_only.blobs.open(reference) == SECRET
    finally:
        newest_only.close()
    assert f"v1.{rotated.newest}.".encode() in _stored(store, request, reference[REF])
