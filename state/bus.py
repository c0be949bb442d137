"""The control bus's messages, in one place: every producer builds them here (the commit script
too: it publishes the text `encode` made) and every process's control channel reads them here.

The bus is one Redis pub/sub channel that every worker process subscribes to (`workers.control`).
Each message is a JSON object with a ``type``:

    context    a context was committed at ``version`` of ``epoch`` (at time ``t``): drop older L1
               copies. A step's commit of a small context without sensitive values carries its
               ``payload`` (``d``), ``checksum`` (``c``) and ``step``, so a process can move its copy
               forward instead. ``src`` "l3": the change was made in L3 outside runctx, and relayed.
    config     routine definitions or configurations changed in L3 (``keys``); ``trace``: each
               process records when it dropped them (diagnostics)
    run_ended  the run failed or was cancelled: start none of its queued steps
    run_resumed  the run was resumed (`runctx resume`): its steps may start again
    routine    a routine version was stored, or a run of it began: compile its plan ahead
    clear      drop the whole L1
    ask        a question to every process: ``about`` "probe" (what it serves for ``key``) or
               "status" (its health); each answers in the hash ``reply``

Pub/sub is at most once: a process that (re)subscribes clears its L1, and versions, not messages,
decide what is fresh. Anyone who can PUBLISH can send anything: `decode` accepts only these shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

SOURCE_COMMIT = "commit"
SOURCE_L3 = "l3"
ASK_PROBE = "probe"
ASK_STATUS = "status"


@dataclass(frozen=True)
class ContextCommitted:
    context_id: str
    version: int
    epoch: int = 1
    t: float | None = None
    step: str | None = None  # with payload and checksum: the state it carries
    payload: bytes | None = None
    checksum: str | None = None
    source: str = SOURCE_COMMIT

    @property
    def carries_state(self) -> bool:
        return self.step is not None and self.payload is not None and self.checksum is not None


@dataclass(frozen=True)
class ConfigChanged:
    keys: tuple[str, ...]
    identity: str = ""
    trace: bool = False
    t: float | None = None


@dataclass(frozen=True)
class RunEnded:
    run_id: str


@dataclass(frozen=True)
class RunResumed:
    run_id: str


@dataclass(frozen=True)
class RoutineStored:
    routine: str
    version: int


@dataclass(frozen=True)
class ClearL1:
    pass


@dataclass(frozen=True)
class Ask:
    about: str  # ASK_PROBE or ASK_STATUS
    reply: str  # the Redis hash each process answers in
    key: str = ""  # probe: the cache key asked about
    load: bool = False  # probe: load it if this process does not hold it


Message = Union[ContextCommitted, ConfigChanged, RunEnded, RunResumed, RoutineStored, ClearL1, Ask]


def encode(message: Message) -> str:
    return json.dumps(_fields(message))


def _fields(message: Message) -> dict[str, Any]:
    if isinstance(message, ContextCommitted):
        out: dict[str, Any] = {"type": "context", "id": message.context_id, "version": message.version, "epoch": message.epoch}
        if message.t is not None:
            out["t"] = message.t
        if message.source == SOURCE_L3:
            out["src"] = SOURCE_L3
        if message.carries_state:
            assert message.payload is not None
            out.update(step=message.step, d=message.payload.decode(), c=message.checksum)
        return out
    if isinstance(message, ConfigChanged):
        return {"type": "config", "keys": list(message.keys), "identity": message.identity, "trace": message.trace, "t": message.t}
    if isinstance(message, RunEnded):
        return {"type": "run_ended", "run": message.run_id}
    if isinstance(message, RunResumed):
        return {"type": "run_resumed", "run": message.run_id}
    if isinstance(message, RoutineStored):
        return {"type": "routine", "routine": message.routine, "version": message.version}
    if isinstance(message, ClearL1):
        return {"type": "clear"}
    return {"type": "ask", "about": message.about, "reply": message.reply, "key": message.key, "load": message.load}


def decode(raw: bytes | str) -> Message:
    """The message ``raw`` holds; ValueError if it is not one of the bus's messages."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("not an object")
    kind = data.get("type")
    if kind == "context":
        payload, checksum, step = data.get("d"), data.get("c"), data.get("step")
        carried = isinstance(payload, str) and isinstance(checksum, str) and isinstance(step, str)
        return ContextCommitted(
            context_id=_text(data, "id"), version=_integer(data, "version"), epoch=_integer(data, "epoch", 1),
            t=_time(data), step=step if carried else None, payload=payload.encode() if carried else None,
            checksum=checksum if carried else None, source=SOURCE_L3 if data.get("src") == SOURCE_L3 else SOURCE_COMMIT,
        )
    if kind == "config":
        keys = data.get("keys", [])
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise ValueError("config: keys must be a list of strings")
        identity = data.get("identity", "")
        return ConfigChanged(tuple(keys), identity if isinstance(identity, str) else "", data.get("trace") is True, _time(data))
    if kind == "run_ended":
        return RunEnded(_text(data, "run"))
    if kind == "run_resumed":
        return RunResumed(_text(data, "run"))
    if kind == "routine":
        return RoutineStored(_text(data, "routine"), _integer(data, "version"))
    if kind == "clear":
        return ClearL1()
    if kind == "ask":
        about = data.get("about")
        if about not in (ASK_PROBE, ASK_STATUS):
            raise ValueError(f"ask: unknown question {str(about)[:40]!r}")
        key = data.get("key", "")
        return Ask(about, _text(data, "reply"), key if isinstance(key, str) else "", data.get("load") is True)
    raise ValueError(f"unknown message type {str(kind)[:40]!r}")


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _integer(data: dict[str, Any], name: str, default: int | None = None) -> int:
    value = data.get(name, default)
    if type(value) is not int:
        raise ValueError(f"{name} must be an integer")
    return value


def _time(data: dict[str, Any]) -> float | None:
    value = data.get("t")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
