"""Large values kept beside a context's L2 payload (`state.detached`), as the codec makes and reads
them, without servers: a payload holds marks, a commit's fields are those its changes made, a
sensitive value's field is sealed, a reader takes unchanged values from the version it holds."""

from __future__ import annotations

import pytest

from state.codec import Codec
from state.detached import DETACH_BYTES
from state.errors import ContextCorruption, DetachedNotHeld
from state.models import DataSensitivity, RunContext, RunContextInit
from state.sealing import Keyring

SECRET = "s3cr3t-" * (DETACH_BYTES // 5)
PLAIN = "p" * (DETACH_BYTES + 1)


def _codec() -> Codec:
    return Codec(Keyring.parse(Keyring.new_entry()))


def _context() -> RunContext:
    return RunContext.from_init(
        RunContextInit(
            run_id="run", routine_id="r", variables={"token": SECRET, "doc": PLAIN, "n": 1, "small": "s"},
            sensitivity_map={"token": DataSensitivity.SECRET},
        )
    )


def test_a_payload_holds_marks_and_a_sensitive_field_is_sealed() -> None:
    codec, ctx = _codec(), _context()
    payload = codec.dump_state(ctx)
    fields = codec.pending_fields(ctx).write
    assert set(fields) == {"x:v:token", "x:v:doc"} and len(payload) < 2_000
    assert b"s3cr3t" not in payload and b"s3cr3t" not in fields["x:v:token"] and b"$sealed" in fields["x:v:token"]
    read = codec.load_state(payload, [], fields=fields)
    assert (read.get("token"), read.get("doc"), read.get("n")) == (SECRET, PLAIN, 1)
    assert read.sensitivity_of("token") is DataSensitivity.SECRET


def test_only_what_a_working_copy_changed_is_written() -> None:
    codec, ctx = _codec(), _context()
    codec.dump_state(ctx)
    codec.stored(ctx)
    small = ctx.working_copy()
    small.set_variable("n", 2)
    codec.dump_state(small)
    assert codec.pending_fields(small).empty
    raised = ctx.working_copy()
    raised.raise_sensitivity("doc", DataSensitivity.CONFIDENTIAL)  # same value, sealed now
    codec.dump_state(raised)
    assert set(codec.pending_fields(raised).write) == {"x:v:doc"}
    shrunk = ctx.working_copy()
    shrunk.set_variable("doc", "short now")
    codec.dump_state(shrunk)
    assert codec.pending_fields(shrunk).write == {} and codec.pending_fields(shrunk).drop == ("x:v:doc",)


def test_a_reader_takes_unchanged_values_from_the_version_it_holds() -> None:
    codec, ctx = _codec(), _context()
    first = codec.dump_state(ctx)
    held = codec.load_state(first, [], fields=codec.pending_fields(ctx).write)
    working = held.working_copy()
    working.set_variable("n", 5)
    payload = codec.dump_state(working)
    followed = codec.load_state(payload, [], known=held)
    assert followed.get("token") is held.get("token") and followed.get("n") == 5
    with pytest.raises(DetachedNotHeld):
        codec.load_state(payload, [])
    other = RunContext.from_init(RunContextInit(run_id="other", routine_id="r", variables={"n": 1}))
    with pytest.raises(DetachedNotHeld):  # another context's values are never taken
        codec.load_state(payload, [], known=other)


def test_a_field_moved_to_another_variable_does_not_open() -> None:
    codec, ctx = _codec(), _context()
    ctx.set_variable("token2", SECRET + "!", sensitivity=DataSensitivity.SECRET)
    payload = codec.dump_state(ctx)
    fields = codec.pending_fields(ctx).write
    fields["x:v:token2"] = fields["x:v:token"]  # its digest no longer matches the mark
    with pytest.raises(ContextCorruption):
        codec.load_state(payload, [], fields=fields)


def test_a_childs_inherited_large_value_is_detached_too() -> None:
    codec, parent = _codec(), _context()
    child = parent.create_child("r", inherit=["doc"], context_id="run/child")
    codec.dump_state(child)
    assert {"x:v:doc", "x:h:doc"} <= set(codec.pending_fields(child).write)
