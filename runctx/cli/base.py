"""What every command shares: the Typer app, exit codes, one-line errors, the client of a command.

Exit codes are the same for every command: 0 done, 1 a failure or a mistake (one line on stderr
says which), 2 a malformed command line, 3 nothing to do (what was asked for was so already).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from runctx.embedded import embedded_released
from state.errors import RunctxError

if TYPE_CHECKING:
    from runctx.api import Client

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOTHING_TO_DO = 3


def _plain_help_labels() -> None:
    """Typer 0.29 labels each parameter in ``--help`` with its Python annotation (``<bool>``,
    ``<list[str]>``) and braces required arguments (``{file}``); show what click shows instead:
    the metavar we give or the value's kind (PATH, INTEGER), nothing for a flag, ``FILE`` bare."""
    from typer import core

    kinds = {int: "INTEGER", float: "NUMBER", str: "TEXT"}

    def display_type(self: Any, ctx: Any) -> str | None:
        described = self.type_descriptor
        if described.annotation is bool:
            return None
        if self.metavar:
            return str(self.metavar)
        if described.is_path:
            return "PATH"
        return kinds.get(described.annotation, "VALUE")

    def usage_name(self: Any) -> str:
        name = self.display_name_raw.upper()
        return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")

    core._TyperParameter.display_type = display_type  # type: ignore[method-assign]
    core.TyperArgument._usage_display_name = usage_name  # type: ignore[method-assign]


_plain_help_labels()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # a docstring's line breaks are not kept in the help: sentences stay whole
    help="runctx: routines on Celery workers with a three-tier RunContext store. Log records reach "
    "stderr only with -v (-vv: debug).",
)

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object and nothing else.")


def one_line(message: str) -> str:
    """A message as one line (a path may hold a newline)."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def fail(message: str, code: int = EXIT_FAILED) -> None:
    """Say what went wrong in one line on stderr and end the command."""
    typer.echo(f"runctx: {one_line(message)}", err=True)
    raise typer.Exit(code)


def usage_error(option: str, message: str) -> typer.BadParameter:
    """A malformed command line (exit 2): raise what this returns."""
    return typer.BadParameter(message, param_hint=option)


def echo_json(document: Any) -> None:
    typer.echo(json.dumps(document))


@contextlib.contextmanager
def client() -> Iterator[Client]:
    """A client for one command: the embedded stack released at the end, runctx's errors as one line."""
    from runctx.api import Client

    with embedded_released():
        try:
            yield Client()
        except RunctxError as exc:
            fail(str(exc))


def parse_vars(pairs: list[str]) -> dict[str, Any]:
    """NAME=VALUE pairs; a VALUE that is valid JSON is taken as JSON, anything else as a string."""
    variables: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            fail(f"--var {pair!r}: expected NAME=VALUE", EXIT_USAGE)
        try:
            variables[name] = json.loads(raw)
        except json.JSONDecodeError:
            variables[name] = raw
        except RecursionError:
            fail(f"--var {name}: the value nests too deep")
    return variables


def variables_of(pairs: list[str], var_file: Path | None) -> dict[str, Any]:
    """--var-file's mapping, then --var pairs over it."""
    from runctx.api import load_var_file

    variables: dict[str, Any] = {}
    if var_file is not None:
        try:
            variables.update(load_var_file(var_file))
        except RunctxError as exc:
            fail(str(exc))
    variables.update(parse_vars(pairs))
    return variables


VAR_OPTION = typer.Option([], "--var", metavar="NAME=VALUE", help="Set a variable: NAME=VALUE (VALUE as JSON, else a string).")
VAR_FILE_OPTION = typer.Option(
    None, "--var-file", metavar="FILE", help="Variables from a YAML or JSON mapping (the way to give secrets)."
)
