"""The database every piece of L3 shares: its engine, its transactions and the errors it maps.

Every write runs in one transaction as the role ``runctx_writer`` (migration 0006; only its members
may take it, so change-event listeners can tell runctx's writes from plain SQL and a plain-SQL
session cannot pass for runctx), with optimistic locking on versions and
retries with backoff for transient failures. This module and `state/schema.py` are the only
places that speak SQL to the tables.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from state.codec import DEFAULT_CODEC, Codec
from state.errors import CommunicationFailure, RefusedByDatabase, TransactionFailed
from state.models import StateCacheConfig
from state.settings import DEFAULT_DEPLOYMENT

log = logging.getLogger(__name__)

WRITER_ROLE = "runctx_writer"  # migration 0006: the role runctx's own transactions run as
T = TypeVar("T")

# SQLSTATEs worth another try: serialization failure, deadlock, lock timeout.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03"}


def _is_transient(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in _TRANSIENT_SQLSTATES


def _refused(operation: str, exc: DBAPIError) -> RefusedByDatabase:
    """A permanent database error as a runctx error, without the statement's parameters or data."""
    diag = getattr(exc.orig, "diag", None)
    reason = getattr(diag, "message_primary", None) or type(exc.orig).__name__
    return RefusedByDatabase(operation, getattr(exc.orig, "sqlstate", None), reason)


def _reason(exc: DBAPIError) -> str:
    """What went wrong, without DETAIL or CONTEXT (PostgreSQL quotes the offending data there)."""
    diag = getattr(exc.orig, "diag", None)
    primary = getattr(diag, "message_primary", None) or type(exc.orig).__name__
    return f"{primary} [{getattr(exc.orig, 'sqlstate', None) or '-'}]"


def _is_connection_error(exc: DBAPIError) -> bool:
    return isinstance(exc, (OperationalError, InterfaceError)) and (
        exc.connection_invalidated or getattr(exc.orig, "sqlstate", None) in (None, "08000", "08001", "08006", "57P01")
    )


class PostgresDatabase:
    """One PostgreSQL database's engine. Owns the engine; promises that every operation is one
    transaction run as runctx's own (all or nothing), that transient failures are retried with
    backoff, and that what still fails leaves as TransactionFailed, CommunicationFailure or (for
    good) RefusedByDatabase, never with the values it was about to write."""

    def __init__(self, engine: Engine, *, config: StateCacheConfig, codec: Codec = DEFAULT_CODEC, deployment: str = DEFAULT_DEPLOYMENT) -> None:
        """``deployment``: whose runs this process sees (deployments may share a database)."""
        self.engine = engine
        self.deployment = deployment
        self._as_writer: bool | None = None  # whether transactions run as WRITER_ROLE (found out once)
        self.codec = codec
        self.retry_attempts = config.l3_retry_attempts
        self.retry_base_delay_s = config.l3_retry_base_delay_s
        self.keep_history = config.history

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Any:
        # hide_parameters: an error never carries the values it was about to write.
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, hide_parameters=True)
        return cls(engine, **kwargs)

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One L3 transaction, marked as runctx's own: run as the role runctx_writer (which only
        its members may take), or, where there is no such role, by the runctx.origin setting."""
        with self.engine.begin() as conn:
            if self._as_writer is None:
                self._as_writer = bool(
                    conn.execute(
                        text("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = :role) AND pg_has_role(:role, 'MEMBER')"),
                        {"role": WRITER_ROLE},
                    ).scalar()
                )
            if self._as_writer:
                conn.execute(text(f"SET LOCAL ROLE {WRITER_ROLE}"))
            else:
                conn.execute(text("SELECT set_config('runctx.origin', 'runctx', true)"))
            yield conn

    def run(self, operation: str, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a transaction, retrying transient failures with exponential backoff."""
        for attempt in range(1, self.retry_attempts + 1):
            try:
                with self.transaction() as conn:
                    return work(conn)
            except DBAPIError as exc:
                retryable = _is_transient(exc) or _is_connection_error(exc)
                if not retryable:
                    raise _refused(operation, exc) from None
                if attempt == self.retry_attempts:
                    if _is_connection_error(exc):
                        raise CommunicationFailure("L3 (PostgreSQL)", _reason(exc)) from None
                    raise TransactionFailed(operation, attempt, RuntimeError(_reason(exc))) from None
                delay = self.retry_base_delay_s * (2 ** (attempt - 1)) * (1 + random.random())
                log.warning("L3 %s failed (attempt %d), retrying in %.2fs: %s", operation, attempt, delay, _reason(exc))
                time.sleep(delay)
        raise AssertionError("unreachable")

    def read(self, work: Callable[[Connection], T]) -> T:
        try:
            with self.engine.connect() as conn:
                return work(conn)
        except DBAPIError as exc:
            if _is_connection_error(exc):
                raise CommunicationFailure("L3 (PostgreSQL)", _reason(exc)) from None
            raise _refused("L3 read", exc) from None

    def ping(self) -> bool:
        return self.read(lambda conn: conn.execute(text("SELECT 1")).scalar() == 1)
