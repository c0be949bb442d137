"""Pure checks of names, values and sizes (no I/O): what runctx and PostgreSQL can store.

The fixed bounds here hold for every context whatever its ResourceLimits: a value nests at most
``MAX_NESTING`` levels (deeper would exhaust Python's stack in the JSON codec), and no string or
key holds a NUL character (PostgreSQL's JSONB refuses ``\u0000``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from state.errors import InvalidValue

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,199}$")
MAX_NESTING = 64  # levels of lists and objects in one value (and in a routine file)
MAX_TEXT_LENGTH = 200  # names, scopes and keys stored in L3 columns of this width
MAX_ITEMS = 10_000  # a fan-out's items (RUNCTX_MAX_ITEMS)
MAX_CONTEXT_ID_LENGTH = 300  # a context id: "<run id>/<sub-routine step ids>"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


def shown(value: Any, limit: int = 60) -> str:
    """A value as an error message may show it: short, and safe for any object (a 5000-digit
    integer cannot even be turned into text)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 1024:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_run_id(run_id: str) -> str:
    """A run id: 1 to 100 letters, digits, ``_ . -`` (it names keys and rows)."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise InvalidValue(f"run id {shown(run_id, 120)}: must be 1 to 100 letters, digits, '_', '.', '-'")
    return run_id


def check_name(name: str) -> str:
    """A variable name: a letter or _, then letters, digits, ``_ . -``; at most 200 characters."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidValue(
            f"variable name {shown(name, 300)}: must start with a letter or '_' and hold only letters, digits, "
            "'_', '.', '-' (at most 200 characters)"
        )
    return name


def canonical_json(value: Any) -> str:
    """The one JSON form runctx stores and measures: sorted keys, no spaces, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _check_json(name: str, value: Any, path: str, depth: int = 0) -> None:
    """Refuse what would not come back unchanged from JSON (tuples, sets, non-string keys, objects),
    what nests deeper than MAX_NESTING, and NUL characters."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidValue(f"variable {name!r}: a string{' at ' + path if path else ''} holds a NUL character (\\u0000)")
        return
    if value is None or isinstance(value, (bool, int, float)):
        return
    if isinstance(value, (list, dict)) and depth >= MAX_NESTING:
        raise InvalidValue(f"variable {name!r}: nests deeper than {MAX_NESTING} levels")
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(name, item, f"{path}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidValue(f"variable {name!r}: key {shown(key)} at {path or 'top level'} is not a string")
            if "\x00" in key:
                raise InvalidValue(f"variable {name!r}: a key at {path or 'top level'} holds a NUL character (\\u0000)")
            _check_json(name, item, f"{path}.{key}", depth + 1)
        return
    where = f" at {path}" if path else ""
    raise InvalidValue(f"variable {name!r}: a {type(value).__name__}{where} is not a JSON value (use lists, objects, strings, numbers, booleans, null)")


def json_size(name: str, value: Any) -> int:
    """Bytes the value takes as canonical JSON; refuses what JSON cannot hold exactly."""
    _check_json(name, value, "")
    try:
        return len(canonical_json(value).encode())
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 text holds it
        raise InvalidValue(f"variable {name!r}: a string is not valid Unicode text") from None
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
