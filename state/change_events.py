"""Change events of L3: PostgreSQL NOTIFY (sent by triggers after commit) turned into callbacks.

LISTEN/NOTIFY keeps nothing for a disconnected listener, so ``on_connected`` is called after
every (re)connection: whoever caches must treat that as "anything may have changed".
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Callable

import psycopg
from sqlalchemy.engine import make_url

from state.schema import CHANGE_CHANNEL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChangeEvent:
    table: str
    op: str  # INSERT, UPDATE, DELETE
    key: str  # routine:<name>, config:<kind>:<name>, context:<context_id>
    version: int | None
    origin: str  # 'runctx' for runctx's own transactions, '' for anything else
    txid: int = 0  # the committing transaction: with key and op, tells one change from another

    @property
    def kind(self) -> str:
        return self.key.split(":", 1)[0]

    @property
    def ident(self) -> str:
        return self.key.split(":", 1)[1]

    @classmethod
    def parse(cls, payload: str) -> "ChangeEvent":
        data = json.loads(payload)
        version = data.get("version")
        return cls(
            table=data["table"],
            op=data["op"],
            key=data["key"],
            version=None if version is None else int(version),
            origin=data.get("origin") or "",
            txid=int(data.get("txid") or 0),
        )

    @property
    def identity(self) -> str:
        return f"{self.txid}:{self.op}:{self.key}:{self.version}"


def libpq_url(database_url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as a conninfo that psycopg accepts."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """A daemon thread holding one autocommit connection that LISTENs on the change channel."""

    def __init__(
        self,
        database_url: str,
        on_event: Callable[[ChangeEvent], None],
        *,
        on_connected: Callable[[], None] | None = None,
        channel: str = CHANGE_CHANNEL,
        poll_s: float = 0.5,
    ) -> None:
        self.conninfo = libpq_url(database_url)
        self.on_event = on_event
        self.on_connected = on_connected
        self.channel = channel
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, wait_s: float = 10.0) -> "ChangeListener":
        self._thread = threading.Thread(target=self._run, name="runctx-change-listener", daemon=True)
        self._thread.start()
        if wait_s > 0 and not self._ready.wait(wait_s):
            log.warning("change listener not connected after %.1fs; it keeps trying", wait_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {self.channel}")  # takes effect at once: autocommit
                    if self.on_connected is not None:
                        self.on_connected()
                    self._ready.set()
                    backoff = 0.1
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=self.poll_s):
                            self._dispatch(notify.payload)
            except psycopg.Error as exc:
                self._ready.clear()
                if self._stop.is_set():
                    return
                log.warning("change listener lost its connection (%s); reconnecting in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _dispatch(self, payload: str) -> None:
        try:
            event = ChangeEvent.parse(payload)
        except (ValueError, KeyError) as exc:
            log.error("ignoring malformed change event %r: %s", payload[:200], exc)
            return
        try:
            self.on_event(event)
        except Exception:  # a failing handler must not kill the listener
            log.exception("change event handler failed for %s", event.key)
