"""Large values kept beside a context's L2 payload, so that a commit sends and stores only what changed.

A value whose JSON is over `DETACH_BYTES` lives in a field of the context's L2 entry of its own
(``x:<scope>:<name>``, sealed when the variable is confidential or secret) and the payload holds a
mark in its place, ``{"$detached": <digest of the field>, "size": <the value's size>}``. The payload's MAC covers the digests,
and a field is checked against its digest when it is read, so a field can no more be forged than
the payload. A commit writes the fields of the values its step changed and leaves the others as
they are; a process that holds the version before (in L1) takes the unchanged values from it, so a
step's message can carry the small payload alone. L3 does the same beside its snapshots
(`state.tiers.postgres.held`).

What a context knows of its detached values (`Detachments`) rides along with it: for each field,
the value object it was made from, its digest, its size as canonical JSON and, until it is stored,
its data. A value replaced by a step is another object, so "unchanged" is an identity check.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

DETACH_BYTES = 16 * 1024  # a value's JSON over this many bytes is kept beside the payload
MARK = "$detached"
SCOPES = {"variables": "v", "intermediate": "i", "inherited": "h"}
FIELD_PREFIX = "x:"


def is_mark(value: Any) -> bool:
    """Whether a payload's value is a detached value's mark: ``{"$detached": digest, "size": n}``."""
    return isinstance(value, dict) and isinstance(value.get(MARK), str) and value.keys() <= {MARK, "size"}


def field_of(scope: str, name: str) -> str:
    return f"{FIELD_PREFIX}{SCOPES[scope]}:{name}"


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Detachment:
    """One detached value: the object it was made from, its field's digest, the value's size
    (canonical JSON) and sensitivity (its seal's binding); ``data``: the field as stored, kept
    only until the commit that stores it."""

    value: Any
    digest: str
    size: int
    level: str
    data: bytes | None = None

    def without_data(self) -> Detachment:
        return self if self.data is None else Detachment(self.value, self.digest, self.size, self.level)


Detachments = dict[str, Detachment]  # field -> detachment


@dataclass(frozen=True)
class Fields:
    """What a commit changes among an entry's detached fields: those to write, those to drop."""

    write: dict[str, bytes]
    drop: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.write and not self.drop
