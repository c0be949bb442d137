"""The `runctx` command: a module per group of commands (as Celery's ``celery/bin/``).

    base.py        the Typer app, exit codes, one-line errors, the client a command uses
    running.py     run, submit, wait (and the progress display)
    inspecting.py  runs, status, context
    operating.py   cancel, resume, fork, signal, prune
    checking.py    check, migrate
    worker.py      worker
    stack.py       stack up | down | status
    keys.py        keys new | rotate
    main.py        the entry point: logging, usage errors, exit codes
"""

from runctx.cli.main import app, main

__all__ = ["app", "main"]
