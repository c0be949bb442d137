"""Two workarounds for kombu 5.7's Redis transport, installed when the Celery app is imported.

**A client per channel, not per command.** The transport builds a new ``redis.Redis`` for every
publish, acknowledgement and event (``Channel.conn_or_acquire`` -> ``_create_client``), and
redis-py 8 fills a table of ~170 response callbacks in each constructor: measured here, 0.35 ms of
CPU per publish (``step.apply_async`` 1.0 ms -> 0.67 ms), paid several times per task (the step's
successor, its ack, its task events). The client is a thin handle on the channel's connection
pool, safe to share between threads, so each channel keeps one for as long as its pool lives.

**A connection that is gone.**

When the broker connection drops while a worker holds an unacknowledged message (a step running),
Celery closes the channel; the Redis transport's QoS then tries to restore that message (on close)
or to acknowledge it (when the task ends) through the connection that is already gone:
``_connparams`` reads ``connection.client.hostname`` from a transport whose client or connection
is None. The AttributeError reaches Celery's consumer as "Unrecoverable error", and the whole
worker node exits instead of reconnecting (seen when Redis restarts).

Neither call is needed for correctness here: the message stays in the transport's unacked set (or
is gone with a Redis that restarted empty), the visibility timeout returns it, a step delivered
again applies once, and runctx's watchdog resumes the run sooner anyway. So a restore, ack or
reject that fails because the connection is gone is logged and skipped.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


def _tolerant(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except AttributeError as exc:  # the connection is gone: see the module docstring
            log.warning("broker connection gone: %s skipped, the visibility timeout returns the message (%s)", name, exc)
            if name == "restore_unacked":
                self._delivered.clear()
            return None

    call.runctx_fix = True  # type: ignore[attr-defined]
    return call


def _one_client_per_pool(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def create(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:  # the consumer's client: kombu caches it already
            return original(self, True)
        pool = self.pool
        client = self.__dict__.get("_runctx_client")
        if client is None or client.connection_pool is not pool:  # a new pool after a reconnect
            client = self.__dict__["_runctx_client"] = original(self, False)
        return client

    create.runctx_fix = True  # type: ignore[attr-defined]
    return create


def install() -> None:
    for name in ("restore_unacked", "ack", "reject"):
        original = getattr(kombu_redis.QoS, name)
        if not getattr(original, "runctx_fix", False):
            setattr(kombu_redis.QoS, name, _tolerant(name, original))
    if not getattr(kombu_redis.Channel._create_client, "runctx_fix", False):
        kombu_redis.Channel._create_client = _one_client_per_pool(kombu_redis.Channel._create_client)
