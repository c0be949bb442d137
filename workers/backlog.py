"""How many of runctx's messages wait in the broker: the watchdog's way to tell a busy cluster from
a broken one (`tasks.watchdog`).

A queue's depth by a passive declare (kombu's, so the same call asks RabbitMQ and the Redis
transport): the messages no worker has taken yet. Those a worker took and holds unacknowledged are
left out: a step running has its process say it is alive, and one held by a node that died is
lost work the watchdog is there to find. A queue that does not exist holds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery import Celery

log = logging.getLogger(__name__)


class BrokerBacklog:
    """Counts the messages waiting in ``queues``. Owns nothing; each count opens a connection of the
    app's pool (one passive declare per queue), so a caller asks only when it needs to know."""

    def __init__(self, app: Celery, queues: Sequence[str]) -> None:
        self.app = app
        self.queues = tuple(queues)

    def __call__(self) -> int:
        total = 0
        with self.app.connection_for_read() as conn:
            for name in self.queues:
                channel = conn.channel()
                try:
                    total += channel.queue_declare(queue=name, passive=True).message_count
                except Exception as exc:  # NOT_FOUND: a queue never declared
                    log.debug("queue %s: %s", name, exc)
                finally:
                    _close(channel)
        return total


def _close(channel) -> None:
    try:
        channel.close()
    except Exception:  # a channel the broker closed already (AMQP closes one on NOT_FOUND)
        pass
