"""Conditions (``when:``) in Common Expression Language: compiled when a routine is loaded, evaluated
on a context's variables, never calling out or running user code.

CEL (the `common-expression-language` package, a binding of the Rust `cel` crate) is what
Kubernetes, Envoy and Hatchet use for the same job: side-effect free, terminating, typed, with the
usual operators, indexing, ``in``, ``size``, ``has``, conversions, the string predicates and the
macros (``all``, ``exists``, ``exists_one``, ``map``, ``filter``). An expression may use only what
the Rust crate itself implements (the binding's Python ``cel.stdlib`` is not added): no function of
ours, and values given as plain variables (never as functions), so nothing an expression does can
reach outside the values it is given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import cel

from state.errors import StepFailed

MAX_EXPRESSION_LENGTH = 1000

# The functions the Rust `cel` crate implements (what `Program.functions()` may report besides
# operators). Not here: what only the binding's opt-in Python `cel.stdlib` provides (``max``,
# ``min``, ``bool``, ``lowerAscii``, ``split``, ``substring``...): they would pass a check here and
# then fail every evaluation as an undefined name.
KNOWN_FUNCTIONS = frozenset(
    {
        "size", "has", "int", "uint", "double", "string", "bytes", "type", "dyn", "duration", "timestamp",
        "contains", "startsWith", "endsWith", "matches", "all", "exists", "exists_one", "map", "filter",
        "getDate", "getDayOfMonth", "getDayOfWeek", "getDayOfYear", "getFullYear", "getHours",
        "getMilliseconds", "getMinutes", "getMonth", "getSeconds",
    }
)
# CEL's operators as `Program.functions()` names them (a name like `_foo_` is a function, not one of these).
KNOWN_OPERATORS = frozenset(
    {
        "_+_", "_-_", "_*_", "_/_", "_%_", "_==_", "_!=_", "_<_", "_<=_", "_>_", "_>=_", "_&&_", "_||_",
        "!_", "-_", "_[_]", "_?_:_", "@in", "@not_strictly_false",
    }
)


class ExpressionFailed(StepFailed):
    """A condition that could not be evaluated on a run's context (a missing variable, a type error,
    a value that is not true or false): the step fails with one line naming the expression."""


class Condition:
    """A compiled ``when`` expression. Owns its source and program; promises that a Condition exists
    only for an expression that parsed and calls only CEL's own functions."""

    __slots__ = ("_names", "_program", "source")

    def __init__(self, source: str, program: Any) -> None:
        self.source = source
        self._program = program
        self._names = tuple(program.variables())

    @classmethod
    def parse(cls, source: str) -> Condition:
        """Compile ``source``; a ValueError names the place (line:column) and the problem in one line."""
        if not source.strip():
            raise ValueError("an expression cannot be empty")
        if len(source) > MAX_EXPRESSION_LENGTH:
            raise ValueError(f"an expression is at most {MAX_EXPRESSION_LENGTH} characters (this one {len(source)})")
        try:
            program = cel.compile(source)
        except Exception as exc:  # the binding raises ValueError for syntax; be safe with the rest
            raise ValueError(f"expression {_short(source)!r} is not valid CEL: {_syntax_problem(str(exc))}") from None
        unknown = sorted(name for name in program.functions() if name not in KNOWN_FUNCTIONS and name not in KNOWN_OPERATORS)
        if unknown:
            raise ValueError(f"expression {_short(source)!r} calls unknown function {', '.join(map(repr, unknown))}")
        return cls(source, program)

    @property
    def variables(self) -> list[str]:
        """The names the expression reads (including those its macros bind)."""
        return list(self._names)

    def evaluate(self, variables: Mapping[str, Any]) -> bool:
        """True or false on ``variables``; ExpressionFailed (one line) when it cannot say which."""
        try:
            # A Context's variables are values only: a callable among them is refused, where a plain
            # dict given to `execute` would register it as a function the expression could call.
            # Only the variables the expression names are converted (not every value of a context of
            # up to 16 MiB at each evaluation); CEL has no way to name a variable at run time.
            given = {name: variables[name] for name in self._names if name in variables}
            value = self._program.execute(cel.Context(variables=given))
        except Exception as exc:
            raise ExpressionFailed(f"when {_short(self.source)!r}: {_runtime_problem(exc, self.source, self.variables)}") from None
        if not isinstance(value, bool):
            raise ExpressionFailed(f"when {_short(self.source)!r} gave {_cel_type(value)}, not true or false")
        return value

    def __str__(self) -> str:
        return self.source

    def __repr__(self) -> str:
        return f"Condition({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Condition) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)


def _short(source: str) -> str:
    flat = " ".join(source.split())
    return flat if len(flat) <= 80 else flat[:77] + "..."


def _syntax_problem(text: str) -> str:
    """The binding's message reduced to its first line with the place: ``1:9: Syntax error: ...``."""
    match = re.search(r"<input>:(\d+:\d+): (.*)", text)
    line = f"at {match.group(1)}: {match.group(2)}" if match else text.splitlines()[0] if text else "syntax error"
    return line[:200]


def _runtime_problem(exc: Exception, source: str, variables: list[str]) -> str:
    """What went wrong, in one line that never holds a value (a RunctxError never carries one): the
    binding's messages quote the values they failed on (a map's missing key, an index, the operands
    of an overflow, a string that does not parse), so only names the expression itself spells and
    details without quotes or digits are kept."""
    text = str(exc)
    undefined = re.search(r"Undefined variable or function: '([^']+)'", text)
    if undefined and undefined.group(1) in variables:
        return f"no variable {undefined.group(1)!r} (a secret variable is seen only by a step that reads it)"
    if undefined:  # a known function on operands it has no overload for (`x.size()` on a number)
        return f"{undefined.group(1)}() does not take operands of these types"
    if isinstance(exc, KeyError):  # `m.k` or `m['k']` on a map without that key
        key = exc.args[0] if exc.args else None
        spelt = isinstance(key, str) and re.search(rf"(\.\s*{re.escape(key)}\b|['\"]{re.escape(key)}['\"])", source)
        return f"a map has no key {key!r} (has(m.k) tests for one)" if spelt else "a map has no such key"
    if isinstance(exc, IndexError):
        return "an index is out of the list's bounds"
    if isinstance(exc, ZeroDivisionError):
        return "division or modulo by zero"
    if text.startswith("No such overload"):
        return "the operands' types do not fit the operator (CEL does not convert between types)"
    converted = re.match(r"Failed to convert variable '([^']+)'", text)
    if converted:
        return f"variable {converted.group(1)!r} holds a value CEL cannot take"
    function = re.match(r"Function '(\w+)' error: ([^\n]*?)(\. Check function.*)?$", text.splitlines()[0] if text else "")
    if function:
        detail = function.group(2)
        clean = not re.search(r"['\"\d]", detail)
        return f"{function.group(1)}() failed on its arguments" + (f": {detail[:120]}" if clean else "")
    if isinstance(exc, OverflowError):
        operation = re.match(r"Arithmetic overflow in '(\w+)'", text)
        return "arithmetic overflow" + (f" in {operation.group(1)!r}" if operation else "")
    first = text.splitlines()[0] if text else ""
    return first[:200] if first and not re.search(r"['\"\d]", first) else f"evaluation failed ({type(exc).__name__})"


def _cel_type(value: Any) -> str:
    """A value's type as CEL names it (an expression's author thinks in CEL, not Python)."""
    names = {int: "an int", float: "a double", str: "a string", bytes: "bytes", list: "a list", dict: "a map"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
