"""Change events of L3: PostgreSQL NOTIFY (sent by triggers after commit) turned into callbacks.

LISTEN/NOTIFY keeps nothing for a disconnected listener, so ``on_connected`` is called after
every (re)connection: whoever caches must treat that as "anything may have changed".
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from sqlalchemy.engine import make_url

from state.keys import config_key, context_change_key, routine_key
from state.schema import CHANGE_CHANNEL

log = logging.getLogger(__name__)


_KINDS = {"routines": "routine", "configurations": "config", "context_snapshots": "context"}


@dataclass(frozen=True)
class ChangeEvent:
    """One committed change of a routine, configuration or context, as the L3 trigger reports it."""

    table: str
    op: str  # INSERT, UPDATE, DELETE
    ident: tuple[str, ...]  # the row's key columns: (name,), (kind, name) or (context_id,)
    version: int | None
    origin: str  # 'runctx' for runctx's own transactions, '' for anything else
    txid: int = 0  # the committing transaction: with key and op, tells one change from another

    @property
    def kind(self) -> str:
        """routine, config or context."""
        return _KINDS[self.table]

    @property
    def context_id(self) -> str:
        return self.ident[0]

    @property
    def key(self) -> str:
        """What changed, named as `state.keys` names it."""
        if self.kind == "routine":
            return routine_key(self.ident[0])
        if self.kind == "config":
            return config_key(*self.ident)
        return context_change_key(self.ident[0])

    @property
    def cache_keys(self) -> list[str]:
        """The L1/L2 cache keys this change makes stale (a routine: its newest and its own version)."""
        if self.kind == "routine":
            return [routine_key(self.ident[0]), routine_key(self.ident[0], self.version)]
        if self.kind == "config":
            return [config_key(*self.ident)]
        return []

    @classmethod
    def parse(cls, payload: str) -> ChangeEvent:
        """Parse a NOTIFY payload; ValueError for anything that is not a runctx change event."""
        try:
            data = json.loads(payload)
            table, ident = data["table"], tuple(str(part) for part in data["ident"])
            if not isinstance(table, str) or table not in _KINDS:
                raise ValueError(f"not a runctx table: {str(table)[:60]!r}")
            if len(ident) != (2 if table == "configurations" else 1):
                raise ValueError(f"{table}: the key columns are wrong: {str(ident)[:100]}")
            version = data.get("version")
            return cls(
                table=table,
                op=str(data["op"]),
                ident=ident,
                version=None if version is None else int(version),
                origin=str(data.get("origin") or ""),
                txid=int(data.get("txid") or 0),
            )
        except Exception as exc:  # NOTIFY needs no privilege: anyone may send anything (even RecursionError)
            raise ValueError(f"not a change event ({type(exc).__name__}: {str(exc)[:200]})") from None

    @property
    def identity(self) -> str:
        return f"{self.txid}:{self.op}:{self.key}:{self.version}"


def libpq_url(database_url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as a conninfo that psycopg accepts."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """A daemon thread holding one autocommit connection that LISTENs on the change channel.

    Promises: any payload and any error is logged, never fatal (a failing handler or a lost
    connection ends in a reconnect); ``on_connected`` runs after every (re)connection, since
    nothing was kept for it while it was away.
    """

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

    def start(self, wait_s: float = 10.0) -> ChangeListener:
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
        """Listening now: connected, and its thread alive."""
        return self._ready.is_set() and self._thread is not None and self._thread.is_alive()

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
            except Exception as exc:  # whatever happens, the listener lives on: it reconnects
                self._ready.clear()
                if self._stop.is_set():
                    return
                log.warning("change listener lost its connection (%s); reconnecting in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _dispatch(self, payload: str) -> None:
        """Handle one notification; never raises (what follows it on the connection must not be lost)."""
        try:
            event = ChangeEvent.parse(payload)
        except ValueError as exc:
            log.error("ignoring malformed change event %r: %s", payload[:200], exc)
            return
        try:
            self.on_event(event)
        except Exception:  # a failing handler must not kill the listener
            log.exception("change event handler failed for %s", event.key)
