"""The watch channel: what runs changed, as commits and events announce it (`state.tiers.data.
watch_message`), for whoever shows runs live (the web inspector). One subscription per process,
however many pages watch; pub/sub is at most once, so a (re)subscription is reported too: a
watcher then reads what it shows again."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import redis

from state.store import TieredStore

log = logging.getLogger(__name__)

RESYNC = {"run": "*", "status": "resync"}  # what a watcher is told after a (re)subscription


class RunWatch:
    """A daemon thread subscribed to the store's watch channel. Owns its subscription; promises
    ``on_change`` each announcement it hears (a dict: run, context, version, step, status) and
    `RESYNC` after every (re)subscription; a store without Redis (the in-memory twin) hears nothing."""

    def __init__(self, store: TieredStore, on_change: Callable[[dict[str, Any]], None]) -> None:
        self.client = getattr(store.l2, "client", None)
        keys = getattr(store.l2, "keys", None)
        self.channel = keys.watch_channel if keys is not None else ""
        self.on_change = on_change
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RunWatch:
        if self.client is not None:
            self._thread = threading.Thread(target=self._run, name="runctx-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self.client.pubsub()  # type: ignore[union-attr]
            try:
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self.subscribed.set()
                        backoff = 0.1
                        self.on_change(dict(RESYNC))
                    elif message["type"] == "message":
                        self._handle(message["data"])
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self.subscribed.clear()
                log.warning("watch channel lost (%s); resubscribing in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("watch channel message failed")
            finally:
                pubsub.close()

    def _handle(self, raw: bytes | str) -> None:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("run"), str):
                raise ValueError("no run")
        except ValueError:  # anyone who can PUBLISH can send anything
            log.warning("ignoring a malformed watch message %r", raw[:100])
            return
        self.on_change(data)
