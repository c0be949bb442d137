"""The entry point of `runctx`: logging (silent unless -v), usage errors in one line, exit codes."""

from __future__ import annotations

import logging
import sys

import typer

from runctx.cli import checking, history, inspecting, keys, operating, running, stack, web, worker  # noqa: F401  (they register their commands)
from runctx.cli.base import EXIT_FAILED, EXIT_USAGE, app, one_line
from state.errors import RunctxError

__all__ = ["app", "main"]

VERBOSE_FLAGS = {"-v": 1, "--verbose": 1, "-vv": 2, "-vvv": 2}

# Typer's own usage errors (a missing or malformed option), to be printed as one line.
_UsageError = typer.BadParameter.__mro__[1]


def _take_verbosity(argv: list[str]) -> tuple[list[str], int]:
    """-v/--verbose anywhere before ``--`` (what follows ``--`` belongs to `celery worker`)."""
    end = argv.index("--") if "--" in argv else len(argv)
    level = sum(VERBOSE_FLAGS.get(arg, 0) for arg in argv[:end])
    return [arg for arg in argv[:end] if arg not in VERBOSE_FLAGS] + argv[end:], level


def configure_logging(verbosity: int) -> None:
    """Log records reach stderr only when asked: -v (info) or -vv (debug). Without it, nothing: a
    command says what happened in its own lines (Python's last-resort handler is kept out too)."""
    root = logging.getLogger()
    if verbosity <= 0:
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.CRITICAL + 1)
        return
    logging.basicConfig(
        level=logging.DEBUG if verbosity > 1 else logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def main() -> None:
    argv, verbosity = _take_verbosity(sys.argv[1:])
    configure_logging(verbosity)
    if not argv:  # the help, not an error message after it
        app(["--help"], standalone_mode=False, prog_name="runctx")
        sys.exit(EXIT_USAGE)
    try:
        code = app(argv, standalone_mode=False, prog_name="runctx")
        sys.exit(code if isinstance(code, int) else 0)
    except _UsageError as exc:  # one line naming the option, not a framed box
        where = f"runctx {exc.ctx.command_path.removeprefix('runctx').strip()}".strip() if exc.ctx else "runctx"  # type: ignore[attr-defined]
        typer.echo(f"{where}: {one_line(exc.format_message())} (see --help)", err=True)  # type: ignore[attr-defined]
        sys.exit(EXIT_USAGE)
    except typer.Abort:
        typer.echo("runctx: aborted", err=True)
        sys.exit(130)
    except RunctxError as exc:  # a command that did not catch its own
        typer.echo(f"runctx: {one_line(str(exc))}", err=True)
        sys.exit(EXIT_FAILED)
    except Exception as exc:  # no traceback reaches a user: one line, and the type to search for
        typer.echo(f"runctx: unexpected error: {type(exc).__name__}: {one_line(str(exc))}", err=True)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
