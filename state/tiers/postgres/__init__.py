"""L3 on PostgreSQL, the authoritative record (SQLAlchemy 2 Core over psycopg 3): a piece per concern
over one database (`database`). These modules and `state/schema.py` are the only places that speak
SQL to the tables.

    database.py   the engine, transactions as runctx's own role, retries, errors
    contexts.py   context snapshots          (L3Contexts)
    ledger.py     runs, exports, blackboard  (L3Ledger)
    waits.py      waits and signals          (L3Waits)
    blobs.py      values stored by reference (L3Blobs)
    configs.py    routines, configurations   (L3Configs)
    keys.py       the keys in use            (L3Keys)

Every write runs in one transaction as the role ``runctx_writer`` (migration 0006; only its members
may take it, so change-event listeners can tell runctx's writes from plain SQL and a plain-SQL
session cannot pass for runctx), with optimistic locking on versions.
"""

from __future__ import annotations

from state.tiers.postgres.configs import PostgresConfigs
from state.tiers.postgres.database import WRITER_ROLE
from state.tiers.postgres.keys import PostgresKeys
from state.tiers.postgres.ledger import PostgresLedger

__all__ = ["WRITER_ROLE", "PostgresTier"]


class PostgresTier(PostgresLedger, PostgresConfigs, PostgresKeys):
    """L3 on one PostgreSQL database (`L3Tier`): owns the runctx tables (their schema is in
    `state.schema`). Promises: every operation is one transaction (all or nothing); a context write
    is a compare-and-set or "only if newer", never a lost update."""
