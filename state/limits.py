"""Pure checks of names and sizes against ResourceLimits (no I/O)."""

from __future__ import annotations

import json
import re
from typing import Any

from state.errors import InvalidValue

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,199}$")


def check_name(name: str) -> str:
    """A variable name: a letter or _, then letters, digits, ``_ . -``; at most 200 characters."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidValue(
            f"variable name {name!r}: must start with a letter or '_' and hold only letters, digits, "
            "'_', '.', '-' (at most 200 characters)"
        )
    return name


def canonical_json(value: Any) -> str:
    """The one JSON form runctx stores and measures: sorted keys, no spaces, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def json_size(name: str, value: Any) -> int:
    """Bytes the value takes as canonical JSON; refuses what JSON cannot hold."""
    try:
        return len(canonical_json(value).encode())
    except (TypeError, ValueError) as exc:
        raise InvalidValue(f"variable {name!r}: value is not JSON-serializable ({exc})") from exc
