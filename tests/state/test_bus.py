"""The control bus's messages (state/bus.py), pure: each message survives `encode` -> `decode`, and
`decode` refuses anything else with ValueError (anyone who can PUBLISH can send anything)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from state.bus import (
    ASK_PROBE,
    ASK_STATUS,
    SOURCE_COMMIT,
    SOURCE_L3,
    Ask,
    ClearL1,
    ConfigChanged,
    ContextCommitted,
    Message,
    RoutineStored,
    RunEnded,
    decode,
    encode,
)

MESSAGES: list[Message] = [
    ContextCommitted("run-1", 4),
    ContextCommitted("run-1/sub", 9, epoch=3, t=1712345678.25),
    ContextCommitted("run-1", 5, epoch=2, t=1.5, step="s5", payload=b'{"context_id":"run-1","version":5}', checksum="k1:abc"),
    ContextCommitted("run-1", 6, source=SOURCE_L3),
    ConfigChanged(("routine:daily@2", "config:bot:alice"), identity="ev-1", trace=True, t=2.0),
    ConfigChanged(()),
    RunEnded("run-1"),
    RoutineStored("daily", 2),
    ClearL1(),
    Ask(ASK_PROBE, "reply:1", key="routine:daily", load=True),
    Ask(ASK_STATUS, "reply:2"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_comes_back_as_it_was_sent(message: Message) -> None:
    text = encode(message)
    assert isinstance(json.loads(text), dict)
    assert decode(text) == message
    assert decode(text.encode()) == message  # as Redis delivers it


def test_a_commit_carries_its_state_only_with_step_payload_and_checksum_together() -> None:
    carried = decode(encode(MESSAGES[2]))
    assert isinstance(carried, ContextCommitted) and carried.carries_state and carried.payload == MESSAGES[2].payload
    partial = ContextCommitted("run-1", 5, step="s5", payload=b"{}")  # no checksum: nothing to trust it by
    assert not partial.carries_state
    assert decode(encode(partial)) == ContextCommitted("run-1", 5)
    forged = {"type": "context", "id": "run-1", "version": 5, "step": "s5", "d": {"not": "text"}, "c": "k1:abc"}
    assert decode(json.dumps(forged)) == ContextCommitted("run-1", 5)


def test_only_l3_is_a_source_other_than_a_commit() -> None:
    message = decode(json.dumps({"type": "context", "id": "run-1", "version": 1, "src": "elsewhere"}))
    assert isinstance(message, ContextCommitted) and message.source == SOURCE_COMMIT


def test_optional_fields_that_are_not_what_they_should_be_are_taken_as_absent() -> None:
    assert decode('{"type": "context", "id": "c", "version": 1, "t": "soon"}') == ContextCommitted("c", 1)
    assert decode('{"type": "context", "id": "c", "version": 1, "t": true}') == ContextCommitted("c", 1)
    assert decode('{"type": "config", "keys": ["routine:r"], "identity": 5, "trace": "yes"}') == ConfigChanged(("routine:r",))
    assert decode('{"type": "ask", "about": "probe", "reply": "h", "key": 5, "load": 1}') == Ask(ASK_PROBE, "h")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\xff\xfe\xfd", "not JSON"),
        ("{", "not JSON"),
        ("", "not JSON"),
        ("[1, 2]", "not an object"),
        ('"clear"', "not an object"),
        ("null", "not an object"),
        ("{}", "unknown message type 'None'"),
        ('{"type": "explode"}', "unknown message type 'explode'"),
        ('{"type": ["context"]}', "unknown message type"),
        ('{"type": "context", "version": 1}', "id must be a non-empty string"),
        ('{"type": "context", "id": "", "version": 1}', "id must be a non-empty string"),
        ('{"type": "context", "id": 7, "version": 1}', "id must be a non-empty string"),
        ('{"type": "context", "id": "c"}', "version must be an integer"),
        ('{"type": "context", "id": "c", "version": "3"}', "version must be an integer"),
        ('{"type": "context", "id": "c", "version": 3.0}', "version must be an integer"),
        ('{"type": "context", "id": "c", "version": true}', "version must be an integer"),
        ('{"type": "context", "id": "c", "version": 3, "epoch": null}', "epoch must be an integer"),
        ('{"type": "config", "keys": "routine:r"}', "config: keys must be a list of strings"),
        ('{"type": "config", "keys": ["routine:r", 2]}', "config: keys must be a list of strings"),
        ('{"type": "run_ended"}', "run must be a non-empty string"),
        ('{"type": "run_ended", "run": ["r"]}', "run must be a non-empty string"),
        ('{"type": "routine", "routine": "daily"}', "version must be an integer"),
        ('{"type": "routine", "version": 2}', "routine must be a non-empty string"),
        ('{"type": "ask", "about": "secrets", "reply": "h"}', "ask: unknown question 'secrets'"),
        ('{"type": "ask", "reply": "h"}', "ask: unknown question 'None'"),
        ('{"type": "ask", "about": "status"}', "reply must be a non-empty string"),
    ],
)
def test_decode_refuses_what_is_not_a_bus_message(raw: Any, problem: str) -> None:
    with pytest.raises(ValueError) as refused:
        decode(raw)
    assert problem in str(refused.value), str(refused.value)


def test_a_refusal_quotes_at_most_a_little_of_what_was_sent() -> None:
    with pytest.raises(ValueError) as refused:
        decode(json.dumps({"type": "x" * 10_000}))
    assert len(str(refused.value)) < 100
