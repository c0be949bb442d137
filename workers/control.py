"""The control channel: each worker process's subscription to the control bus (`state.bus` says what
travels on it), and the questions a command asks every process through it.

Celery's remote control reaches only a worker's main process, so each prefork child runs its own
subscription (started from ``worker_process_init``). Pub/sub is at most once: a process that
(re)subscribes clears its L1, and versions, not messages, decide what is fresh. An invalidation
only makes a stale entry go away sooner.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from state import bus
from state.change_events import ChangeEvent
from state.errors import NotFound
from state.keys import RedisKeys, config_key
from state.metrics import metrics
from state.store import TieredStore
from state.tiers.data import CommittedState

log = logging.getLogger(__name__)

TRACE_KIND = "runctx-trace"  # changes to configurations of this kind record when each process drops them
TRACE_PREFIX = config_key(TRACE_KIND, "")
REPLY_TTL_S = 60


def process_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ControlChannel:
    """One process's end of the control bus: owns its subscription thread.

    Promises: every invalidation it receives evicts this process's L1 copy (never a newer one);
    after any (re)subscription its L1 is empty, since what was published meanwhile is lost; each
    L3 change event is relayed (L2 eviction + broadcast) by exactly one process that received it.
    """

    def __init__(self, store: TieredStore, client: redis.Redis, prefix: str, *, identity: str | None = None) -> None:
        self.store = store
        self.client = client  # the subscription's own (a cluster client on a Redis Cluster)
        self.keys = RedisKeys(prefix)
        self.channel = self.keys.control_channel
        self.identity = identity or process_identity()
        self.health: Callable[[], dict[str, Any]] = dict  # the runtime plugs in its listener's state
        # The runtime plugs in what prepares a run's steps (compiling its plan), done off this thread.
        self.prepare: Callable[[str, int], None] | None = None
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- sending --------------------------------------------------------------------------------

    def publish(self, message: bus.Message) -> int:
        return self.store.bus.publish(message)

    def relay_change(self, event: ChangeEvent) -> None:
        """Turn an L3 change event into an L2 eviction and a broadcast; one process relays each event."""
        if event.kind == "context" and event.origin == "runctx":
            return  # runctx's own write-behind: its commit already broadcast the version
        if not self.client.set(self.keys.relayed_event(event.identity), 1, nx=True, px=60_000):
            return  # another process (every worker listens to L3) relays this one
        self.store.invalidation.handle_change(event)
        if event.kind == "context":
            self.publish(bus.ContextCommitted(event.context_id, event.version or 0, t=time.time(), source=bus.SOURCE_L3))
        else:
            self.publish(
                bus.ConfigChanged(tuple(event.cache_keys), event.identity, event.key.startswith(TRACE_PREFIX), time.time())
            )

    # ---- receiving ------------------------------------------------------------------------------

    def start(self) -> ControlChannel:
        self._thread = threading.Thread(target=self._run, name="runctx-control", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self.client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Anything published while we were not subscribed is lost: start clean.
                        self.store.invalidation.clear()
                        self.subscribed.set()
                        backoff = 0.1
                    elif message["type"] == "message":
                        self._handle_raw(message["data"])
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self.subscribed.clear()
                self.store.invalidation.clear()
                log.warning("control channel lost (%s); resubscribing in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("control channel message failed")
            finally:
                pubsub.close()

    def _handle_raw(self, data: bytes) -> None:
        try:
            message = bus.decode(data)
        except ValueError as exc:  # anyone who can PUBLISH can send anything
            log.error("ignoring malformed control message %r: %s", data[:200], exc)
            return
        self.handle(message)

    def handle(self, message: bus.Message) -> None:
        invalidation = self.store.invalidation
        if isinstance(message, bus.ContextCommitted):
            self._count(message.source, message.t)
            state = None
            if message.carries_state:
                assert message.step is not None and message.payload is not None and message.checksum is not None
                state = CommittedState(message.context_id, message.version, message.epoch, (message.step,), message.payload, message.checksum)
            invalidation.take_commit(message.context_id, message.version, state=state)
        elif isinstance(message, bus.RunEnded):
            self._count("run_ended", None)
            invalidation.run_ended(message.run_id)
        elif isinstance(message, bus.RunResumed):
            invalidation.run_resumed(message.run_id)
        elif isinstance(message, bus.RoutineStored):
            if self.prepare is not None:
                self.prepare(message.routine, message.version)
        elif isinstance(message, bus.ConfigChanged):
            self._count("l3", message.t)
            dropped = [key for key in message.keys if invalidation.forget_config(key)]
            if message.trace:
                trace = self.keys.trace(message.identity)
                self.client.hset(trace, self.identity, repr(time.time()))
                self.client.expire(trace, REPLY_TTL_S)
            log.debug("dropped %s", dropped)
        elif isinstance(message, bus.ClearL1):
            invalidation.clear()
        elif isinstance(message, bus.Ask):
            self._answer(message)

    @staticmethod
    def _count(source: str, sent: float | None) -> None:
        """Count an invalidation by its ``source``: a commit's broadcast, a change made in L3, a run ended."""
        instruments = metrics()
        instruments.invalidations.labels(source).inc()
        if sent is not None:  # clocks of two hosts: a negative delay means skew, not speed
            instruments.invalidation_delay.labels(source).observe(max(0.0, time.time() - sent))

    def _answer(self, question: bus.Ask) -> None:
        if question.about == bus.ASK_STATUS:
            answer = {"subscribed": self.subscribed.is_set(), **self.health()}
        else:
            entry = self.store.configs.held(question.key)
            if entry is None and question.load:
                try:
                    entry = self.store.configs.get_cached(question.key)
                except NotFound:
                    entry = None
            # Keyed: a digest anyone on the channel could compare with guesses would tell them the value.
            answer = {"version": None, "digest": None} if entry is None else {"version": entry.version, "digest": self.store.configs.digest(entry)}
        self.client.hset(question.reply, self.identity, json.dumps(answer))
        self.client.expire(question.reply, REPLY_TTL_S)


def ask_every_process(client: redis.Redis, prefix: str, about: str, *, key: str = "", load: bool = False, wait_s: float = 1.0) -> dict[str, dict[str, Any]]:
    """Ask every subscribed process a question (`state.bus.Ask`) and wait for their answers (up to
    ``wait_s``): identity -> answer."""
    keys = RedisKeys(prefix)
    reply = keys.probe_reply(os.urandom(6).hex())
    receivers = client.publish(keys.control_channel, bus.encode(bus.Ask(about, reply, key, load)))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and client.hlen(reply) < receivers:
        time.sleep(0.01)
    return {field.decode(): json.loads(value) for field, value in client.hgetall(reply).items()}


def probe(client: redis.Redis, prefix: str, key: str, *, load: bool = False, wait_s: float = 1.0) -> dict[str, dict[str, Any]]:
    """What every subscribed process serves for the cache key ``key``: identity -> {version, digest}."""
    return ask_every_process(client, prefix, bus.ASK_PROBE, key=key, load=load, wait_s=wait_s)


def process_status(client: redis.Redis, prefix: str, *, wait_s: float = 1.0) -> dict[str, dict[str, Any]]:
    """Every subscribed worker process's health: identity -> {subscribed, listener, node_pid, checks}."""
    return ask_every_process(client, prefix, bus.ASK_STATUS, wait_s=wait_s)
