"""Which Redis, PostgreSQL and broker runctx talks to: the configured ones, or the embedded stack.

``broker_url_for`` only computes a URL (the embedded stack's socket path is known before it
runs), so `celeryconfig` can name the broker without starting anything; ``resolve`` starts (or
joins) the embedded stack when a URL is missing. Neither migrates: the worker boot and the
commands do that (`state.migrate.upgrade`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from runctx.embedded.layout import Layout
from state.sentinel import SentinelURL, is_sentinel
from state.settings import Settings, get_settings


@dataclass(frozen=True)
class Servers:
    redis_url: str
    database_url: str
    broker_url: str
    embedded: bool
    start_s: float = 0.0  # how long finding or starting them took

    def environment(self) -> dict[str, str]:
        """RUNCTX_* variables that point another process (a worker) at these servers."""
        return {
            "RUNCTX_REDIS_URL": self.redis_url,
            "RUNCTX_DATABASE_URL": self.database_url,
            "RUNCTX_BROKER_URL": self.broker_url,
        }


def celery_broker_url(redis_url: str) -> str:
    """kombu spells a Redis Unix socket ``redis+socket://``; redis-py spells it ``unix://``; and
    Sentinels ``sentinel://h1:p1;sentinel://h2:p2`` (the master's name: `broker_transport_options`)."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url[len("unix://") :]
    if is_sentinel(redis_url):
        return SentinelURL.parse(redis_url).kombu_url()
    return redis_url


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's transport options the broker needs besides runctx's own: the master's name and the
    Sentinels' credentials, for a broker behind Sentinel."""
    url = settings.broker_url or settings.redis_url
    return SentinelURL.parse(url).kombu_options() if is_sentinel(url) else {}


def uses_embedded(settings: Settings) -> bool:
    return not (settings.redis_url and settings.database_url)


def broker_url_for(settings: Settings) -> str:
    """The Celery broker: the configured one, else the Redis (configured or embedded). Starts nothing."""
    if settings.broker_url:
        return celery_broker_url(settings.broker_url)
    redis_url = settings.redis_url or Layout(settings.data_dir.expanduser().resolve()).redis_url
    return celery_broker_url(redis_url)


_embedded = None  # the EmbeddedStack this process started, kept for the life of the process


def resolve(settings: Settings | None = None) -> Servers:
    """The servers to use; starts (or joins) the embedded stack when no URL is configured.

    The embedded stack stays up while this process lives and stops when the last process
    using it exits, however it exits.
    """
    global _embedded
    settings = settings or get_settings()
    started = time.perf_counter()
    redis_url, database_url = settings.redis_url, settings.database_url
    embedded = uses_embedded(settings)
    if embedded:
        from runctx.embedded.stack import EmbeddedStack

        if _embedded is None:
            _embedded = EmbeddedStack(settings.data_dir).start()
        redis_url = redis_url or _embedded.redis_url
        database_url = database_url or _embedded.database_url
    assert redis_url and database_url
    return Servers(
        redis_url=redis_url,
        database_url=database_url,
        # (a Sentinel URL stays as runctx spells it, naming its master: kombu's is made where it is used)
        broker_url=settings.broker_url or (redis_url if is_sentinel(redis_url) else celery_broker_url(redis_url)),
        embedded=embedded,
        start_s=time.perf_counter() - started,
    )


@contextlib.contextmanager
def embedded_released() -> Iterator[None]:
    """Release this process's hold on the embedded stack at the end of the block."""
    global _embedded
    try:
        yield
    finally:
        if _embedded is not None:
            _embedded.stop()
            _embedded = None
