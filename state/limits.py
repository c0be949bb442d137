"""Pure checks of names and sizes against ResourceLimits (no I/O)."""

from __future__ import annotations

import json
import re
from typing import Any

from state.errors import InvalidValue

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,199}$")


def check_name(name: str) -> str:
    """A variable name: a letter or _, then letters, digits, ``_ . -``; at most 200 characters."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidValue(
            f"variable name {name!r}: must start with a letter or '_' and hold only letters, digits, "
            "'_', '.', '-' (at most 200 characters)"
        )
    return name


def canonical_json(value: Any) -> str:
    """The one JSON form runctx stores and measures: sorted keys, no spaces, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _check_json(name: str, value: Any, path: str) -> None:
    """Refuse what would not come back unchanged from JSON: tuples, sets, non-string keys, objects."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(name, item, f"{path}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidValue(f"variable {name!r}: key {key!r} at {path or 'top level'} is not a string")
            _check_json(name, item, f"{path}.{key}")
        return
    where = f" at {path}" if path else ""
    raise InvalidValue(f"variable {name!r}: a {type(value).__name__}{where} is not a JSON value (use lists, objects, strings, numbers, booleans, null)")


def json_size(name: str, value: Any) -> int:
    """Bytes the value takes as canonical JSON; refuses what JSON cannot hold exactly."""
    _check_json(name, value, "")
    try:
        return len(canonical_json(value).encode())
    except ValueError as exc:  # NaN and infinities
        raise InvalidValue(f"variable {name!r}: value is not valid JSON ({exc})") from exc


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON: unlike ==, 1 and true (or 0 and false) differ."""
    if a is b:
        return True
    if type(a) is not type(b) and (isinstance(a, bool) or isinstance(b, bool)):
        return False
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        try:
            return canonical_json(a) == canonical_json(b)
        except (TypeError, ValueError):
            return a == b
    return a == b
