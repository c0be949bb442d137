"""Sensitive values sealed at rest (AES-GCM, bound to where they belong) and payloads authenticated
by a keyed MAC: the codec without servers, then the real L2 and L3 holding only ciphertext."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from state.codec import Codec, checksum
from state.errors import ContextCorruption, KeyNotHeld, SettingsError
from state.models import (
    DataSensitivity,
    ExportDestination,
    RunContext,
    RunContextInit,
    StateCacheConfig,
)
from state.sealing import Keyring, binding, is_sealed

TOKEN = "tok-7f3a-secret-value"
EMAIL = "alice@example.com"


def keyring(n: int = 1) -> Keyring:
    return Keyring.parse(",".join(Keyring.new_entry() for _ in range(n)))


def sensitive_context(run_id: str = "run-1") -> RunContext:
    return RunContext.from_init(
        RunContextInit(
            run_id=run_id,
            routine_id="r@1",
            variables={"token": TOKEN, "email": EMAIL, "user": "alice", "nested": {"deep": [TOKEN]}},
            sensitivity_map={"token": "secret", "email": "confidential", "nested": "secret"},
        )
    )


# ---- the keyring ----------------------------------------------------------------------------------


def test_a_sealed_value_opens_only_where_it_was_sealed() -> None:
    keys = keyring()
    here = binding("run-1", "run-1", "variables", "token", "secret")
    sealed = keys.seal(TOKEN, here)
    assert is_sealed(sealed) and TOKEN not in json.dumps(sealed)
    assert keys.open(sealed, here, where="t") == TOKEN
    for elsewhere in (
        binding("run-2", "run-2", "variables", "token", "secret"),  # another run
        binding("run-1", "run-1", "variables", "other", "secret"),  # another variable
        binding("run-1", "run-1", "variables", "token", "public"),  # relabelled
    ):
        with pytest.raises(ContextCorruption, match="does not open here"):
            keys.open(sealed, elsewhere, where="t")


def test_older_keys_open_what_they_sealed_and_the_newest_seals() -> None:
    old = keyring()
    sealed = old.seal({"a": 1}, b"ad")
    rotated = Keyring(keyring().keys + old.keys)  # a new key first, the old one kept
    assert rotated.open(sealed, b"ad", where="t") == {"a": 1}
    assert rotated.sealed_with(rotated.seal(1, b"ad")) == rotated.newest != old.newest
    with pytest.raises(KeyNotHeld, match="does not hold"):
        keyring().open(sealed, b"ad", where="t")  # a keyring without that key


def test_the_payload_mac_is_keyed() -> None:
    keys = keyring()
    mac = keys.mac(b"payload")
    assert keys.verify(b"payload", mac) and not keys.verify(b"payload!", mac)
    assert not keys.verify(b"payload", checksum(b"payload"))  # an unkeyed checksum is no MAC
    with pytest.raises(KeyNotHeld, match="RUNCTX_ENCRYPTION_KEYS"):  # another process's key: not damage
        keyring().verify(b"payload", mac)


@pytest.mark.parametrize(
    "spec, problem",
    [("nokey", "expected <key id>"), ("k1:not-base64!", "not base64"), ("k1:" + "QQ==", "expected 32"), ("", "no key")],
)
def test_a_bad_key_setting_is_one_clear_line_naming_it(spec: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=problem) as raised:
        Keyring.parse(spec)
    assert "RUNCTX_ENCRYPTION_KEYS" in str(raised.value)


def test_the_key_file_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "data" / "encryption.key"
    first = Keyring.from_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Keyring.from_file(path) == first


# ---- the codec --------------------------------------------------------------------------------------


def test_the_codec_seals_confidential_and_secret_values_and_opens_them_again() -> None:
    codec = Codec(keyring())
    ctx = sensitive_context()
    child = ctx.create_child("child", inherit=["token", "user"], context_id="run-1/sub")
    payload = codec.dump_state(child)
    for plain in (TOKEN.encode(), EMAIL.encode()):
        assert plain not in payload and plain not in codec.dump_state(ctx)
    assert b'"user":"alice"' in codec.dump_state(ctx)  # public values stay readable
    assert codec.load_state(codec.dump_state(ctx), []).variables == ctx.variables
    assert codec.load_state(payload, []).inherited == child.inherited


def test_a_plain_value_where_ciphertext_is_expected_is_refused() -> None:
    codec = Codec(keyring())
    document = Codec().to_document(sensitive_context())  # written without sealing
    with pytest.raises(ContextCorruption, match="stored in plain"):
        codec.from_document(document)


def test_a_ciphertext_moved_to_another_variable_or_run_or_relabelled_is_refused() -> None:
    codec = Codec(keyring())
    document = codec.to_document(sensitive_context())
    moved = json.loads(json.dumps(document))
    moved["variables"]["email"] = moved["variables"]["token"]
    with pytest.raises(ContextCorruption):
        codec.from_document(moved)
    other_run = codec.to_document(sensitive_context("run-2"))
    other_run["variables"]["token"] = document["variables"]["token"]
    with pytest.raises(ContextCorruption):
        codec.from_document(other_run)
    lowered = json.loads(json.dumps(document))
    lowered["sensitivity_map"]["token"] = "public"  # lowering the map does not unseal anything
    with pytest.raises(ContextCorruption):
        codec.from_document(lowered)


def test_without_a_key_sealed_data_is_refused_saying_why() -> None:
    document = Codec(keyring()).to_document(sensitive_context())
    with pytest.raises(ContextCorruption, match="RUNCTX_ENCRYPTION_KEYS"):
        Codec().from_document(document)


def test_sensitive_exports_are_sealed_bound_to_where_they_go() -> None:
    codec = Codec(keyring())
    args = ("run-1", ExportDestination.BLACKBOARD.value, "team", "k", "token", "secret")
    stored = codec.export_value(*args, TOKEN)
    assert is_sealed(stored) and codec.open_export(*args, stored) == TOKEN
    with pytest.raises(ContextCorruption):
        codec.open_export("run-1", "blackboard", "team", "other-key", "token", "secret", stored)
    assert codec.export_value("run-1", "blackboard", "team", "k", "user", "public", "alice") == "alice"


# ---- the real tiers hold ciphertext only ------------------------------------------------------------


def test_redis_and_postgres_hold_no_sensitive_value_in_plain(servers, database_url: str, key_prefix: str) -> None:
    from state.store import TieredStore

    store = TieredStore.connect(
        servers.redis_url, database_url, config=StateCacheConfig(), prefix=key_prefix, keyring=keyring()
    )
    try:
        ctx = store.create_context(sensitive_context(f"seal-{key_prefix[-6:]}"))
        with store.edit(ctx.context_id) as working:
            working.set_variable("derived", TOKEN.upper(), sensitivity="secret")
        store.flush(ctx.context_id)
        client = store.l2.client
        for key in client.scan_iter(match=f"{key_prefix}:*"):
            raw = json.dumps({k.decode(): v.decode(errors="replace") for k, v in client.hgetall(key).items()}) if client.type(key) == b"hash" else ""
            assert TOKEN not in raw and TOKEN.upper() not in raw and EMAIL not in raw, key
        with store.l3.engine.connect() as conn:
            document = conn.execute(
                text("SELECT document::text FROM context_snapshots WHERE context_id = :id"), {"id": ctx.context_id}
            ).scalar_one()
        assert TOKEN not in document and TOKEN.upper() not in document and EMAIL not in document and "$sealed" in document
        store.l1.clear()
        assert store.get_context(ctx.context_id).variables["derived"] == TOKEN.upper()
    finally:
        store.close()


def test_a_forged_l2_entry_is_refused(servers, key_prefix: str) -> None:
    from state.tiers.redis import RedisTier

    tier = RedisTier.from_url(servers.redis_url, prefix=key_prefix, config=StateCacheConfig(), codec=Codec(keyring()))
    try:
        ctx = sensitive_context()
        ctx.version = 1
        tier.fill_context(ctx, live=True)
        forged = ctx.working_copy()
        forged.sensitivity_map["token"] = DataSensitivity.PUBLIC
        forged.variables["token"] = "forged"
        payload = Codec().dump_state(forged)  # what someone with Redis access but no key can write
        tier.client.hset(tier.keys.context("run-1"), mapping={"d": payload, "c": checksum(payload)})
        with pytest.raises(ContextCorruption, match="checksum"):
            tier.get_context("run-1")
    finally:
        tier.close()


def test_a_process_without_a_key_in_use_refuses_to_start_and_a_rotated_keyring_is_accepted(servers, database_url: str, key_prefix: str) -> None:
    from state.store import TieredStore

    first, other = keyring(), keyring()
    stores = [
        TieredStore.connect(servers.redis_url, database_url, config=StateCacheConfig(), prefix=key_prefix, keyring=keys)
        for keys in (first, other)
    ]
    try:
        stores[0].maintenance.check_keys(first)  # the first process records the key it seals with
        with pytest.raises(SettingsError, match="RUNCTX_ENCRYPTION_KEYS") as refused:
            stores[1].maintenance.check_keys(other)
        assert first.newest in str(refused.value)
        stores[1].maintenance.check_keys(Keyring(other.keys + first.keys))  # the new key first, the old one kept
        assert stores[1].l3.key_ids() == {first.newest, other.newest}
    finally:
        for store in stores:
            store.close()


def test_an_entry_under_a_key_this_process_lacks_is_a_configuration_mismatch_not_corruption(
    servers, database_url: str, key_prefix: str
) -> None:
    """A process with other keys (another machine's key file) is told which key it lacks, and the
    entry stays: dropping it as corrupt would throw away the other processes' live state."""
    from state.store import TieredStore

    def store_with(keys: Keyring) -> TieredStore:
        return TieredStore.connect(servers.redis_url, database_url, config=StateCacheConfig(), prefix=key_prefix, keyring=keys)

    mine, theirs = store_with(keyring()), store_with(keyring())
    try:
        ctx = theirs.create_context(sensitive_context(f"mismatch-{key_prefix[-6:]}"))
        with pytest.raises(KeyNotHeld, match="RUNCTX_ENCRYPTION_KEYS") as lacked:
            mine.get_context(ctx.context_id)
        assert "corrupt" not in str(lacked.value)
        with pytest.raises(KeyNotHeld):
            mine.read_for_step(ctx.context_id, epoch=1, at_least=1)
        assert theirs.l2.get_context(ctx.context_id) is not None  # still there for those who hold the key
        assert theirs.get_context(ctx.context_id).variables["token"] == TOKEN
    finally:
        mine.close()
        theirs.close()


def test_rotation_seals_everything_again_under_the_newest_key_and_forgets_the_old(servers, database_url: str, key_prefix: str) -> None:
    from state.store import TieredStore

    old, new = keyring(), keyring()

    def store_with(keys: Keyring) -> TieredStore:
        return TieredStore.connect(servers.redis_url, database_url, config=StateCacheConfig(), prefix=key_prefix, keyring=keys)

    before = store_with(old)
    before.maintenance.check_keys(old)
    flushed = before.create_context(sensitive_context(f"rot-a-{key_prefix[-6:]}"))
    before.flush(flushed.context_id)
    dirty = before.create_context(sensitive_context(f"rot-b-{key_prefix[-6:]}"))
    with before.edit(dirty.context_id) as working:  # committed to L2 only: waiting for its write-behind
        working.set_variable("pending", "in L2", sensitivity="confidential")
    before.close()

    rotating = store_with(Keyring(new.keys + old.keys))
    counts = rotating.maintenance.rotate_keys(Keyring(new.keys + old.keys), batch=1)
    assert counts["l3"] >= 2 and counts["l2"] >= 2
    assert rotating.l3.key_ids() == {new.newest}  # a process with only the new key may start
    rotating.close()

    after = store_with(new)  # the old key is gone everywhere
    try:
        after.maintenance.check_keys(new)
        assert after.l3.get_context(flushed.context_id).variables["token"] == TOKEN
        assert after.get_context(dirty.context_id).variables["pending"] == "in L2"
        assert after.l2.get_context(dirty.context_id).dirty  # still waiting for its write, now under the new key
        after.flush(dirty.context_id)
        assert after.l3.get_context(dirty.context_id).variables["email"] == EMAIL
    finally:
        after.close()


def test_the_hidden_error_of_a_step_that_read_a_secret_is_kept_sealed_with_the_run(servers, database_url: str, key_prefix: str) -> None:
    from runctx.testing import LocalEnvironment
    from state.store import TieredStore

    keys = keyring()
    store = TieredStore.connect(servers.redis_url, database_url, config=StateCacheConfig(), prefix=key_prefix, keyring=keys)
    env = LocalEnvironment(store=store)
    try:
        routine = {
            "name": "hidden-error",
            "variables": {"token": {"sensitivity": "secret"}},
            "steps": [{"id": "call", "action": "tests.support.actions:leak_secret", "reads": ["token"]}],
        }
        run_id = env.submit(routine, variables={"token": TOKEN})
        env.settle(run_id)
        row = store.ledger.get_run(run_id)
        assert row.status == "failed" and TOKEN not in row.error and "<hidden" in row.error
        sealed = row.meta["hidden_error"]
        assert is_sealed(sealed) and TOKEN not in json.dumps(row.meta)
        opened = keys.open(sealed, binding(run_id, run_id, "error", "call", "secret"), where="t")
        assert opened == {"step": "call", "error": f"RuntimeError: upstream refused token {TOKEN}"}
    finally:
        store.close()
