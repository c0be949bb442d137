"""Contexts as L2 payloads and L3 documents (state/codec.py), pure: round trips with and without a
keyring, sensitive values sealed and never read from plain text, applied steps kept out of an L2
payload, and checksums (keyed or not) that a payload must match."""

from __future__ import annotations

import json
from typing import Any

import pytest

from state.codec import Codec, checksum
from state.errors import ContextCorruption, KeyNotHeld
from state.models import DataSensitivity, ExportDestination, ResourceLimits, RunContext, RunContextInit
from state.sealing import Keyring, is_sealed

TOKEN = "tok-91c2-very-secret"
EMAIL = "carol@example.com"
HIDDEN_NOTE = "note-5e7d-confidential"


def keyring(n: int = 1) -> Keyring:
    return Keyring.parse(",".join(Keyring.new_entry() for _ in range(n)))


def plain_context() -> RunContext:
    ctx = RunContext.from_init(
        RunContextInit(
            run_id="run-1", routine_id="r@2", variables={"n": 3, "tags": ["a", "b"], "cfg": {"deep": {"x": None}}},
            intermediate={"scratch": "tmp"}, limits=ResourceLimits(max_variables=50),
        )
    )
    ctx.version, ctx.epoch = 7, 2
    ctx.mark_for_export("n", ExportDestination.BLACKBOARD, scope="team", key="count")
    ctx.mark_applied("s1")
    ctx.mark_applied("s2")
    return ctx


def sensitive_context() -> RunContext:
    ctx = RunContext.from_init(
        RunContextInit(
            run_id="run-1", routine_id="r@2", variables={"token": TOKEN, "email": EMAIL, "user": "carol"},
            intermediate={"note": HIDDEN_NOTE},
            sensitivity_map={"token": DataSensitivity.SECRET, "email": DataSensitivity.CONFIDENTIAL, "note": DataSensitivity.SECRET},
        )
    )
    ctx.version = 3
    ctx.mark_applied("s1")
    return ctx


def child_with_inherited_secret() -> RunContext:
    child = RunContext(context_id="run-1/sub", run_id="run-1", routine_id="kid@1", parent_id="run-1", depth=1, version=1)
    child.set_variable("token", TOKEN, sensitivity=DataSensitivity.SECRET)
    child.inherited = {"token": TOKEN}
    return child


def same_state(a: RunContext, b: RunContext) -> bool:
    return a.model_dump(mode="json") == b.model_dump(mode="json")


# ---- L2 payloads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [None, keyring()], ids=["no keyring", "keyring"])
def test_an_l2_payload_round_trips_with_the_applied_steps_kept_beside_it(keys: Keyring | None) -> None:
    codec = Codec(keys)
    for ctx in (plain_context(), sensitive_context()):
        payload = codec.dump_state(ctx)
        assert "applied_steps" not in json.loads(payload)  # L2 keeps them in a set of their own
        loaded = codec.load_state(payload, list(ctx.applied_steps))
        assert same_state(loaded, ctx)
        assert loaded.has_applied("s1") and not loaded.has_applied("s9")


def test_sensitive_values_in_an_l2_payload_are_sealed_and_public_ones_plain() -> None:
    codec = Codec(keyring())
    payload = codec.dump_state(sensitive_context())
    for plain_text in (TOKEN, EMAIL, HIDDEN_NOTE):
        assert plain_text.encode() not in payload
    data = json.loads(payload)
    assert is_sealed(data["variables"]["token"]) and is_sealed(data["variables"]["email"]) and is_sealed(data["intermediate"]["note"])
    assert data["variables"]["user"] == "carol"


def test_a_payload_holding_applied_steps_is_refused() -> None:
    codec = Codec()
    with_applied = plain_context().model_dump_json().encode()
    with pytest.raises(ContextCorruption, match="a payload holds no applied steps"):
        codec.load_state(with_applied, [], key="ctx:run-1")


@pytest.mark.parametrize(
    ("payload", "problem"),
    [(b"{not json", "not JSON"), (b'{"context_id": 5}', "document does not describe a RunContext"), (b"[1, 2]", "document does not describe a RunContext")],
)
def test_a_payload_that_is_not_a_context_is_corrupt(payload: bytes, problem: str) -> None:
    with pytest.raises(ContextCorruption, match=problem) as refused:
        Codec().load_state(payload, [], key="ctx:run-1")
    assert refused.value.key == "ctx:run-1"


def test_a_plain_value_where_a_sealed_one_belongs_is_refused_never_read() -> None:
    unsealed = Codec().dump_state(sensitive_context())  # written without keys: secrets in plain text
    with pytest.raises(ContextCorruption, match="is (secret|confidential) but stored in plain: refused, never read"):
        Codec(keyring()).load_state(unsealed, ["s1"])


def test_a_sealed_payload_read_without_keys_is_refused() -> None:
    sealed = Codec(keyring()).dump_state(sensitive_context())
    with pytest.raises(ContextCorruption, match="is encrypted and no key is configured"):
        Codec().load_state(sealed, ["s1"])


# ---- L3 documents -------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [None, keyring()], ids=["no keyring", "keyring"])
def test_a_document_round_trips_applied_steps_included(keys: Keyring | None) -> None:
    codec = Codec(keys)
    for ctx in (plain_context(), sensitive_context(), child_with_inherited_secret()):
        document = codec.to_document(ctx)
        assert document["applied_steps"] == list(ctx.applied_steps)
        back = codec.from_document(json.loads(codec.dump_document(document)))
        assert same_state(back, ctx)


def test_a_document_can_leave_out_the_applied_steps() -> None:
    document = Codec().to_document(plain_context(), with_applied=False)
    assert "applied_steps" not in document


def test_sealed_values_in_a_document_include_a_childs_inherited_copies() -> None:
    codec = Codec(keyring())
    document = codec.to_document(child_with_inherited_secret())
    assert is_sealed(document["variables"]["token"]) and is_sealed(document["inherited"]["token"])
    assert TOKEN not in codec.dump_document(document).decode()


def test_without_keys_a_document_keeps_values_as_they_are() -> None:
    document = Codec().to_document(sensitive_context())
    assert document["variables"]["token"] == TOKEN and document["sensitivity_map"]["token"] == "secret"


def test_a_plain_value_in_a_document_where_a_sealed_one_belongs_is_refused() -> None:
    document = Codec().to_document(sensitive_context())
    with pytest.raises(ContextCorruption, match=r"variables\.(token|email) is (secret|confidential) but stored in plain"):
        Codec(keyring()).from_document(document, key="snapshot run-1")


def test_a_sealed_value_moved_to_another_variable_or_relabelled_public_does_not_open() -> None:
    codec = Codec(keyring())
    document = codec.to_document(sensitive_context())
    moved = json.loads(json.dumps(document))
    moved["variables"]["email"] = document["variables"]["token"]  # a secret's ciphertext under another name
    with pytest.raises(ContextCorruption, match="does not open here"):
        codec.from_document(moved)
    relabelled = json.loads(json.dumps(document))
    relabelled["sensitivity_map"]["token"] = "public"
    with pytest.raises(ContextCorruption, match="does not open here"):
        codec.from_document(relabelled)


def test_a_value_sealed_under_a_key_this_process_lacks_is_not_held_not_corrupt() -> None:
    document = Codec(keyring()).to_document(sensitive_context())
    with pytest.raises(KeyNotHeld) as refused:
        Codec(keyring()).from_document(document, key="snapshot run-1")
    assert refused.value.setting == "RUNCTX_ENCRYPTION_KEYS"


@pytest.mark.parametrize("document", [["a", "list"], {"context_id": "c"}, {"context_id": "c", "run_id": "r", "routine_id": "x", "version": "seven"}])
def test_a_document_that_is_not_a_context_is_corrupt(document: Any) -> None:
    with pytest.raises(ContextCorruption, match="document does not describe a RunContext"):
        Codec().from_document(document, key="snapshot c")


def test_a_document_that_is_not_json_is_corrupt() -> None:
    with pytest.raises(ContextCorruption, match="not JSON"):
        Codec().load_document(b"\xff\xfe not json")
    assert Codec().load_document(Codec().dump_document({"b": 1, "a": [None]})) == {"a": [None], "b": 1}


# ---- exports --------------------------------------------------------------------------------------


def test_a_sensitive_export_is_stored_sealed_and_opens_only_for_where_it_goes() -> None:
    codec = Codec(keyring())
    stored = codec.export_value("run-1", "blackboard", "team", "tok", "token", "secret", TOKEN)
    assert is_sealed(stored) and TOKEN not in json.dumps(stored)
    assert codec.open_export("run-1", "blackboard", "team", "tok", "token", "secret", stored) == TOKEN
    with pytest.raises(ContextCorruption, match="does not open here"):
        codec.open_export("run-1", "blackboard", "other-team", "tok", "token", "secret", stored)
    with pytest.raises(ContextCorruption, match="a sensitive export that is not sealed"):
        codec.open_export("run-1", "blackboard", "team", "tok", "token", "secret", TOKEN)
    assert codec.export_value("run-1", "blackboard", "team", "n", "n", "public", 5) == 5


# ---- checksums ------------------------------------------------------------------------------------


def test_an_unkeyed_checksum_matches_its_payload_only() -> None:
    codec = Codec()
    payload = codec.dump_state(plain_context())
    stored = codec.checksum(payload)
    assert stored == checksum(payload)
    assert codec.verify(payload, stored)
    assert not codec.verify(payload.replace(b'"n":3', b'"n":4'), stored)


def test_a_keyed_checksum_is_a_mac_naming_its_key_that_no_unkeyed_checksum_passes() -> None:
    keys = keyring()
    codec = Codec(keys)
    payload = codec.dump_state(sensitive_context())
    mac = codec.checksum(payload)
    assert mac.startswith(f"{keys.newest}:")
    assert codec.verify(payload, mac)
    assert not codec.verify(payload + b" ", mac)
    assert not codec.verify(payload, checksum(payload))  # whoever can write Redis cannot forge an entry
    assert not Codec().verify(payload, mac)


def test_a_mac_under_a_key_this_process_lacks_raises_key_not_held_and_an_older_key_still_verifies() -> None:
    old = keyring()
    payload = Codec(old).dump_state(plain_context())
    mac = Codec(old).checksum(payload)
    with pytest.raises(KeyNotHeld, match=old.newest):
        Codec(keyring()).verify(payload, mac, where="ctx:run-1")
    rotated = Keyring(keyring().keys + old.keys)  # a new key first, the old one still held
    assert Codec(rotated).verify(payload, mac)
    assert Codec(rotated).checksum(payload) != mac  # new payloads are signed with the newest key
