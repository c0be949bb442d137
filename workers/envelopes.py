"""A step task's message as the broker stores it, built in the worker, so that the step before it
can push it in its own commit: the transactional outbox (`state.tiers.data.Outbox`).

What follows a committed step is then sent in the commit's one round trip, and exactly when the
step commits: "committed, but the worker died before it sent the successor" cannot happen (it was
covered before by the broker delivering the step again; it still is, for everything else).

Only where the broker is a Redis on the same server as L2, in its database or another (asked of
the servers, `RedisConnection.outbox_route`: the commit's script selects the broker's database
to push), and the step task's route ends in a queue of the direct exchange, as runctx's
`celeryconfig` routes it; anywhere else (RabbitMQ, another Redis, an L2 on a cluster) steps are
sent by ``apply_async`` as before. The message is the one
``step.apply_async(kwargs=...)`` publishes: Celery's task message (``app.amqp.as_task_v2``, with
the same shadow name, reprs, root and parent ids), serialized as kombu's producer does, in the
envelope kombu's virtual channel makes (``prepare_message``, ``_inplace_augment_message``), on
the list kombu's ``_put`` pushes to. ``tests/workers/test_envelopes.py`` compares it with a real publish.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from celery import Task
from celery.utils import uuid
from kombu import Connection, Queue
from kombu.entity import maybe_delivery_mode
from kombu.serialization import dumps as serialize
from kombu.utils.json import dumps as kombu_json
from kombu.utils.json import loads as json_loads

from state.tiers.data import CommittedState, Outbox
from state.store import TieredStore
from tasks.messages import STATE_HEADER, StepMessage, state_header

log = logging.getLogger(__name__)

_dumps = json.JSONEncoder().encode  # what kombu's JSON encoder writes for strings, None and plain dicts


def _uuid4() -> str:
    """A random UUID as text, as Celery's task ids and kombu's delivery tags are (``str(uuid4())``
    at a third of its CPU)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


PRIORITY = 0  # as apply_async sends a step: no priority; kombu's queue key for 0 is the queue's name


class StepEnvelopes:
    """Builds the broker messages of one task (the step task) for one broker connection.

    Owns that connection (a channel of it supplies kombu's own envelope code); promises messages
    a worker cannot tell from ``apply_async``'s, each with a new task id and delivery tag.
    """

    def __init__(self, task: Task, connection: Connection, queue: Queue, database: int | None = None) -> None:
        """``database``: the broker's database on L2's server when it is not L2's."""
        self.task = task
        self.database = database
        self.app = task.app
        self.connection = connection
        self.channel = connection.default_channel
        self.queue_key = self.channel._q_for_pri(queue.name, PRIORITY)
        self.routing_key = queue.name  # Celery sends to the anonymous exchange, routed by queue name
        self.delivery_mode = maybe_delivery_mode(queue.exchange.delivery_mode or self.app.conf.task_default_delivery_mode)
        self.serializer = self.app.conf.task_serializer
        self.reply_to = self.app.thread_oid
        self._template()

    @classmethod
    def for_broker(cls, task: Task, store: TieredStore) -> StepEnvelopes | None:
        """Envelopes for ``task`` if its commits can push them onto the broker's queue, else None."""
        app = task.app
        route = app.amqp.router.route({}, task.name, (), {})
        queue = route.get("queue")
        if queue is None or getattr(queue.exchange, "type", "direct") != "direct" or route.get("exchange"):
            return None  # sent through an exchange that routes: only kombu knows where it lands
        if route.get("priority") or app.conf.task_default_priority or app.conf.task_inherit_parent_priority:
            return None  # a priority of its own: kombu keeps such messages on other lists
        connection = app.connection_for_write()
        unreachable = (OSError, *connection.connection_errors, *connection.channel_errors)
        try:
            if connection.transport.driver_type != "redis" or connection.transport_options.get("global_keyprefix"):
                connection.release()
                return None
            channel = connection.default_channel
            route = store.outbox_route(channel.client)
            if route is None:
                connection.release()
                return None
            envelopes = cls(task, connection, queue, route.database)
            where = "L2's database" if route.database is None else f"database {route.database}"
            log.info("a step's commit sends its successor (outbox onto %s, %s)", envelopes.queue_key, where)
            return envelopes
        except unreachable as exc:  # the broker is not reachable now: steps go by apply_async
            log.warning("steps are sent by apply_async: the broker could not be asked (%s: %s)", type(exc).__name__, exc)
            connection.release()
            return None

    def successor(self, message: StepMessage, context: str) -> PreparedStep:
        """``message`` prepared to ride in the commit of the step before it (see `PreparedStep`)."""
        return PreparedStep(self, message, context)

    def _published(self, message: StepMessage) -> dict[str, Any]:
        """``message`` as Celery and kombu themselves make it (``as_task_v2``, kombu's serializer,
        ``prepare_message``, ``_inplace_augment_message``), as a top-level task sends it."""
        kwargs = message.as_kwargs()
        reprs = {"argsrepr": "()", "kwargsrepr": repr(kwargs)}  # as CeleryDispatcher.step gives them
        headers, properties, body, _ = self.app.amqp.as_task_v2(
            uuid(), self.task.name, (), kwargs, shadow=self.task.shadow_name((), kwargs, {}), **reprs,
            reply_to=self.reply_to, ignore_result=self.task.ignore_result,
        )
        properties.update(reprs, delivery_mode=self.delivery_mode)  # apply_async's options end up there too
        content_type, content_encoding, data = serialize(body, serializer=self.serializer)
        envelope: dict[str, Any] = self.channel.prepare_message(data, PRIORITY, content_type, content_encoding, headers, properties)
        self.channel._inplace_augment_message(envelope, "", self.routing_key)
        return envelope

    def _template(self) -> None:
        """Templates of the message's text and of its body's, from one message made by ``_published``:
        what differs from one step message to the next becomes a slot."""
        envelope = self._published(StepMessage("run", "routine", 1, 0))
        body = json_loads(self.channel.decode_body(envelope["body"], envelope["properties"]["body_encoding"]))
        self._body = _Template(kombu_json([body[0], _Template.slot("kwargs"), body[2]]))
        envelope["body"] = _Template.slot("body")
        headers, properties = envelope["headers"], envelope["properties"]
        headers.update({name: _Template.slot(name) for name in ("id", "shadow", "root_id", "parent_id", "kwargsrepr")})
        properties.update({name: _Template.slot(name) for name in ("correlation_id", "kwargsrepr", "delivery_tag")})
        self._without_state = _Template(kombu_json(envelope))
        headers[STATE_HEADER] = _Template.slot("state")
        self._with_state = _Template(kombu_json(envelope))

    def close(self) -> None:
        self.connection.release()


class PreparedStep:
    """One step's message as ``step.apply_async(kwargs=message.as_kwargs())`` would publish it, its
    ids (task id, delivery tag, parent and root: the task running now) made once; `outbox` fills in
    the version its predecessor's commit makes and the state it carries.

    Filled into a template of that message's text (`_Template`: made once per process, from one
    message that Celery's and kombu's own code built): the same message at a fraction of the CPU,
    which a step spends on its critical path.
    """

    def __init__(self, envelopes: StepEnvelopes, message: StepMessage, context: str) -> None:
        self.envelopes = envelopes
        self.message = message
        self.context = context
        self.task_id = _uuid4()
        self.delivery_tag = _uuid4()
        parent = envelopes.app.current_worker_task
        self.parent_id = parent.request.id if parent is not None else None
        self.root_id = (parent.request.root_id or self.parent_id) if parent is not None else None
        self.shadow = envelopes.task.shadow_name((), message.as_kwargs(), {})

    def outbox(self, version: int, state: CommittedState | None) -> Outbox:
        envelopes = self.envelopes
        kwargs = self.message.at(self.context, version).as_kwargs()
        kwargsrepr = repr(kwargs)  # as CeleryDispatcher.step gives it
        body = envelopes._body.fill(kwargs=kwargs)
        encoded, _ = envelopes.channel.encode_body(body, envelopes.channel.body_encoding)
        template = envelopes._without_state if state is None else envelopes._with_state
        text = template.fill(
            body=encoded, id=self.task_id, shadow=self.shadow, root_id=self.root_id or self.task_id,
            parent_id=self.parent_id, kwargsrepr=kwargsrepr, correlation_id=self.task_id,
            delivery_tag=self.delivery_tag, state=None if state is None else state_header(state),
        )
        return Outbox(envelopes.queue_key, text.encode(), envelopes.database)


class _Template:
    """A JSON text with slots: ``fill`` puts the JSON of each named value where its slot was.

    Made by encoding a document whose variable parts are ``slot(name)`` strings, so everything
    else is exactly as the encoder wrote it."""

    _MARK = "\x1frunctx-slot:"

    def __init__(self, text: str) -> None:
        self._parts: list[str] = []
        self._names: list[str] = []
        pattern = re.compile(re.escape(json.dumps(self._MARK)[:-1]) + r"([a-z_]+)\"")
        position = 0
        for match in pattern.finditer(text):
            self._parts.append(text[position : match.start()])
            self._names.append(match.group(1))
            position = match.end()
        self._parts.append(text[position:])

    @classmethod
    def slot(cls, name: str) -> str:
        return f"{cls._MARK}{name}"

    def fill(self, **values: Any) -> str:
        out = [self._parts[0]]
        for name, part in zip(self._names, self._parts[1:]):
            out.append(_dumps(values[name]))
            out.append(part)
        return "".join(out)
