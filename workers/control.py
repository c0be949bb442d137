"""The broadcast control channel: a Redis pub/sub channel that every worker process subscribes to.

Celery's remote control reaches only a worker's main process, so each prefork child runs its
own subscription (started from ``worker_process_init``). Messages are JSON:

- ``{"type": "context", "id", "version", "epoch", "t", ["step", "d", "c"]}``: a context was committed at
  ``version`` (at time ``t``); drop older L1 copies, or (a step's commit of a small context carries its
  payload ``d`` and checksum ``c``) move this process's copy forward, so the next step finds it in L1.
  ``"src": "l3"``: the change was made in L3 by someone else, and relayed. A step's commit that
  pushes its successor's message is not broadcast: that message carries the state instead.
- ``{"type": "config", "keys": [...], "identity", "t"}``: routine definitions or configurations changed in L3.
- ``{"type": "run_ended", "run"}``: the run failed; start none of its queued steps.
- ``{"type": "routine", "routine", "version"}``: a routine version was stored, or a run of it began:
  compile its plan before its steps come.
- ``{"type": "clear"}``: drop the whole L1.
- ``{"type": "probe", "id", "key", "load"}``: report what this process serves for ``key`` (diagnostics).
- ``{"type": "status", "id"}``: report this process's health (its change listener alive or not).

Pub/sub is at most once: a process that (re)subscribes clears its L1, and versions, not messages,
decide what is fresh. An invalidation only makes a stale entry go away sooner.
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

from state.change_events import ChangeEvent
from state.errors import NotFound
from state.keys import RedisKeys, config_key
from state.limits import canonical_json
from state.metrics import metrics
from state.store import TieredStore
from state.tiers.contracts import CommittedState
from state.tiers.redis_l2 import RedisTier

log = logging.getLogger(__name__)

TRACE_KIND = "runctx-trace"  # changes to configurations of this kind record when each process drops them
TRACE_PREFIX = config_key(TRACE_KIND, "")
REPLY_TTL_S = 60


# The metrics' ``source`` of each kind of invalidation: a step's commit, a change made in L3, a failed run.
_SOURCES: dict[str, Callable[[dict[str, Any]], str]] = {
    "context": lambda message: "l3" if message.get("src") == "l3" else "commit",  # never a label from outside
    "config": lambda message: "l3",
    "run_ended": lambda message: "run_ended",
}


def process_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ControlChannel:
    """One process's end of the control channel: owns its subscription thread.

    Promises: every invalidation it receives evicts this process's L1 copy (never a newer one);
    after any (re)subscription its L1 is empty, since what was published meanwhile is lost; each
    L3 change event is relayed (L2 eviction + broadcast) by exactly one process that received it.
    """

    def __init__(self, store: TieredStore, redis_tier: RedisTier, *, identity: str | None = None) -> None:
        self.store = store
        self.client: redis.Redis = redis_tier.client
        self.keys: RedisKeys = redis_tier.keys
        self.codec = redis_tier.codec
        self.channel = self.keys.control_channel
        self.identity = identity or process_identity()
        self.health: Callable[[], dict[str, Any]] = dict  # the runtime plugs in its listener's state
        # The runtime plugs in what prepares a run's steps (compiling its plan), done off this thread.
        self.prepare: Callable[[str, int], None] | None = None
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- sending --------------------------------------------------------------------------------

    def publish(self, message: dict[str, Any]) -> int:
        return int(self.client.publish(self.channel, json.dumps(message)))

    def relay_change(self, event: ChangeEvent) -> None:
        """Turn an L3 change event into an L2 eviction and a broadcast; one process relays each event."""
        if event.kind == "context" and event.origin == "runctx":
            return  # runctx's own write-behind: its commit already broadcast the version
        if not self.client.set(self.keys.relayed_event(event.identity), 1, nx=True, px=60_000):
            return  # another process (every worker listens to L3) relays this one
        self.store.handle_change(event)
        if event.kind == "context":
            self.publish({"type": "context", "id": event.context_id, "version": event.version or 0, "src": "l3", "t": time.time()})
        else:
            self.publish(
                {
                    "type": "config",
                    "keys": event.cache_keys,
                    "identity": event.identity,
                    "trace": event.key.startswith(TRACE_PREFIX),
                    "t": time.time(),
                }
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
                        self.store.l1.clear()
                        self.subscribed.set()
                        backoff = 0.1
                    elif message["type"] == "message":
                        self._handle_raw(message["data"])
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self.subscribed.clear()
                self.store.l1.clear()
                log.warning("control channel lost (%s); resubscribing in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("control channel message failed")
            finally:
                pubsub.close()

    def _handle_raw(self, data: bytes) -> None:
        try:
            message = json.loads(data)
            if not isinstance(message, dict):
                raise ValueError("not an object")
            self.handle(message)
        except (ValueError, KeyError, TypeError) as exc:  # anyone who can PUBLISH can send anything
            log.error("ignoring malformed control message %r: %s", data[:200], exc)

    def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        l1 = self.store.l1
        if kind in _SOURCES:
            self._count(message, _SOURCES[kind](message))
        if kind == "context":
            context_id, version = str(message["id"]), int(message["version"])
            self.store.take_commit(context_id, version, state=_carried_state(context_id, version, message))
        elif kind == "run_ended":
            l1.note_run_ended(str(message["run"]))
        elif kind == "routine":
            if self.prepare is not None and isinstance(message.get("routine"), str) and type(message.get("version")) is int:
                self.prepare(message["routine"], message["version"])
        elif kind == "config":
            dropped = [key for key in message.get("keys", []) if l1.evict_config(key)]
            if message.get("trace"):
                trace = self.keys.trace(message["identity"])
                self.client.hset(trace, self.identity, repr(time.time()))
                self.client.expire(trace, REPLY_TTL_S)
            log.debug("dropped %s", dropped)
        elif kind == "clear":
            l1.clear()
        elif kind == "status":
            reply = self.keys.probe_reply(message["id"])
            self.client.hset(reply, self.identity, json.dumps({"subscribed": self.subscribed.is_set(), **self.health()}))
            self.client.expire(reply, REPLY_TTL_S)
        elif kind == "probe":
            self._answer_probe(message)

    @staticmethod
    def _count(message: dict[str, Any], source: str) -> None:
        instruments = metrics()
        instruments.invalidations.labels(source).inc()
        sent = message.get("t")
        if isinstance(sent, (int, float)):  # clocks of two hosts: a negative delay means skew, not speed
            instruments.invalidation_delay.labels(source).observe(max(0.0, time.time() - sent))

    def _answer_probe(self, message: dict[str, Any]) -> None:
        key = message["key"]
        entry = self.store.l1.get_config(key)
        if entry is None and message.get("load"):
            try:
                entry = self.store.get_cached(key)
            except NotFound:
                entry = None
        answer = {"version": None, "digest": None}
        if entry is not None:
            # Keyed: a digest anyone on the channel could compare with guesses would tell them the value.
            answer = {"version": entry.version, "digest": self.codec.checksum(canonical_json(entry.data).encode())}
        reply = self.keys.probe_reply(message["id"])
        self.client.hset(reply, self.identity, json.dumps(answer))
        self.client.expire(reply, REPLY_TTL_S)


def _carried_state(context_id: str, version: int, message: dict[str, Any]) -> CommittedState | None:
    """The state a commit broadcast carries (a step's commit of a small context), if it does."""
    payload, checksum, step_id, epoch = message.get("d"), message.get("c"), message.get("step"), message.get("epoch")
    if not (isinstance(payload, str) and isinstance(checksum, str) and isinstance(step_id, str) and type(epoch) is int):
        return None
    return CommittedState(context_id, version, epoch, (step_id,), payload.encode(), checksum)


def probe(client: redis.Redis, prefix: str, key: str, *, load: bool = False, wait_s: float = 1.0) -> dict[str, dict[str, Any]]:
    """Ask every subscribed process what it serves for ``key``; returns identity -> {version, digest}."""
    keys = RedisKeys(prefix)
    probe_id = os.urandom(6).hex()
    receivers = client.publish(keys.control_channel, json.dumps({"type": "probe", "id": probe_id, "key": key, "load": load}))
    reply = keys.probe_reply(probe_id)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and client.hlen(reply) < receivers:
        time.sleep(0.01)
    return {field.decode(): json.loads(value) for field, value in client.hgetall(reply).items()}


def process_status(client: redis.Redis, prefix: str, *, wait_s: float = 1.0) -> dict[str, dict[str, Any]]:
    """Ask every subscribed worker process for its health; returns identity -> {listener, subscribed}."""
    keys = RedisKeys(prefix)
    probe_id = os.urandom(6).hex()
    receivers = client.publish(keys.control_channel, json.dumps({"type": "status", "id": probe_id}))
    reply = keys.probe_reply(probe_id)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and client.hlen(reply) < receivers:
        time.sleep(0.01)
    return {field.decode(): json.loads(value) for field, value in client.hgetall(reply).items()}
