"""The bounds of a routine definition as data, checked before pydantic sees it: plain JSON, not too
deep, not too large once YAML aliases are expanded, no values JSON cannot hold."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from state.errors import InvalidRoutine
from state.limits import MAX_NESTING, shown

MAX_ROUTINE_FILE_BYTES = 1 << 20  # a routine file, as read from disk
MAX_DEFINITION_BYTES = 1 << 20  # a routine with its sub-routines as JSON, YAML aliases expanded
MAX_INTEGER_BITS = 1024  # about 300 digits: larger numbers are refused, not parsed for minutes


def check_definition(data: Any, source: str) -> int:
    """Refuse what is not plain JSON within bounds, and return its size as JSON (aliases expanded).

    Refused: nesting deeper than MAX_NESTING, NUL characters and lone surrogates, keys that are not
    strings, NaN, infinities and huge integers, YAML's non-JSON values (dates, binary, sets), and
    more than MAX_DEFINITION_BYTES once YAML aliases are expanded. Shared (aliased) parts are
    measured once and counted at every use, so a small file of nested aliases is refused without
    ever being expanded.
    """
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}

    # Where a value is, as (parent, key) links: turned into text only for an error (building a
    # path string for every value would double the cost of checking a large routine).
    Where = tuple[Any, Any] | None

    def refuse(where: Where, problem: str) -> InvalidRoutine:
        return InvalidRoutine(f"{source}: {_path_text(where) or '(top level)'}: {problem}")

    def text(value: str, where: Where) -> int:
        if "\x00" in value:
            raise refuse(where, "a string holds a NUL character (\\u0000)")
        try:
            return len(value.encode("utf-8")) + 2
        except UnicodeEncodeError:
            raise refuse(where, "a string is not valid Unicode text (a lone surrogate)") from None

    def scalar(value: Any, where: Where) -> int:
        if value is None or isinstance(value, bool):
            return 5
        if isinstance(value, int):
            if value.bit_length() > MAX_INTEGER_BITS:
                raise refuse(where, "a number with more than 300 digits")
            return len(str(value))
        if isinstance(value, float):
            if not math.isfinite(value):
                raise refuse(where, f"{value!r} is not a JSON number")
            return len(repr(value))
        raise refuse(where, f"a {type(value).__name__} value is not JSON (YAML dates, binary data and sets are not allowed)")

    def measure(value: Any, level: int, where: Where) -> int:
        if isinstance(value, str):
            return text(value, where)
        if not isinstance(value, (list, dict)):
            return scalar(value, where)
        if level > MAX_NESTING:
            raise refuse(where, f"nests deeper than {MAX_NESTING} levels")
        known = id(value)
        if known in sizes:
            if level + depths[known] > MAX_NESTING:
                raise refuse(where, f"nests deeper than {MAX_NESTING} levels")
            return sizes[known]
        total, deepest = 2, 0
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    raise refuse(where, f"a key ({type(key).__name__} {shown(key, 40)}) is not a string")
                total += text(key, where) + 1
            items: Iterable[tuple[Any, Any]] = value.items()
        else:
            items = enumerate(value)
        for key, item in items:
            total += measure(item, level + 1, (where, key)) + 1
            if isinstance(item, (list, dict)):
                deepest = max(deepest, 1 + depths[id(item)])
            if total > MAX_DEFINITION_BYTES:
                raise InvalidRoutine(
                    f"{source}: the definition is larger than {MAX_DEFINITION_BYTES} bytes (YAML aliases expanded)"
                )
        sizes[known], depths[known] = total, deepest
        return total

    return measure(data, 1, None)


def _path_text(where: tuple[Any, Any] | None) -> str:
    """A value's place as errors show it: ``steps[1].args.name`` (keys cut to 40 characters)."""
    keys = []
    while where is not None:
        where, key = where
        keys.append(key)
    out = ""
    for key in reversed(keys):
        out += f"[{key}]" if isinstance(key, int) else (f".{key[:40]}" if out else key[:40])
    return out


