"""The L3 tables (SQLAlchemy Core). Alembic migrations in ``state/migrations`` create them."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Identity,
    Index,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

CHANGE_CHANNEL = "runctx_changes"

routines = Table(
    "routines",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("definition", JSONB, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # sha256 of the stored JSONB text, computed by the database on insert (migration 0005).
    Column("content_hash", String(64)),
)

# The ids of the keys that sealed values (migration 0004): a process without one refuses to start.
encryption_keys = Table(
    "encryption_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("first_used", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

configurations = Table(
    "configurations",
    metadata,
    Column("kind", String(50), primary_key=True),  # bot, team, ...
    Column("name", String(200), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("data", JSONB, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(100), primary_key=True),
    Column("routine_name", String(200), nullable=False),
    Column("routine_version", Integer),
    Column("root_context_id", String(300), nullable=False),
    Column("status", String(20), nullable=False, index=True),
    Column("epoch", BigInteger, nullable=False, server_default="1"),
    Column("error", Text),
    Column("meta", JSONB, nullable=False, server_default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True)),
    Column("idempotency_key", String(200)),  # migration 0009
    Column("request_digest", String(100)),
    Column("deployment", String(200), nullable=False),  # migration 0013: whose run it is
    UniqueConstraint("deployment", "idempotency_key", name="uq_runs_deployment_idempotency_key"),
    Index("ix_runs_deployment_status", "deployment", "status"),
)

# The latest snapshot of every context, with the version it holds (optimistic locking).
context_snapshots = Table(
    "context_snapshots",
    metadata,
    Column("context_id", String(300), primary_key=True),
    Column("run_id", String(100), nullable=False, index=True),
    Column("parent_id", String(300)),
    Column("version", BigInteger, nullable=False),
    Column("epoch", BigInteger, nullable=False, server_default="1"),
    Column("document", JSONB, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# A context's large plain values, once per run by digest (`state.tiers.postgres.held`, migration
# 0012): snapshots name them, so a write-behind writes only the values that changed.
context_values = Table(
    "context_values",
    metadata,
    Column("run_id", String(100), primary_key=True),
    Column("digest", String(64), primary_key=True),
    Column("value", JSONB, nullable=False),
)

blackboard_entries = Table(
    "blackboard_entries",
    metadata,
    Column("scope", String(200), primary_key=True),  # swarm or team
    Column("key", String(200), primary_key=True),
    Column("value", JSONB),
    Column("sensitivity", String(20), nullable=False),
    Column("run_id", String(100), nullable=False),
    Column("version", BigInteger, nullable=False, server_default="1"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

exports = Table(
    "exports",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("run_id", String(100), nullable=False, index=True),
    Column("variable", String(200), nullable=False),
    Column("key", String(200), nullable=False),
    Column("scope", String(200), nullable=False),
    Column("value", JSONB),
    Column("sensitivity", String(20), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("run_id", "key", "scope", name="uq_exports_run_key_scope"),
)

# A run's history (`state.history`): one row per version of each context and per event, written
# with the snapshots (migration 0008). ``entry`` holds the whole entry, sensitive values sealed.
step_history = Table(
    "step_history",
    metadata,
    Column("entry_id", String(400), primary_key=True),
    Column("run_id", String(100), nullable=False),
    Column("context_id", String(300), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("step_id", String(300), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("at", Float, nullable=False),
    Column("entry", JSONB, nullable=False),
    Column("seq", BigInteger, Identity(always=True), nullable=False),
    Index("ix_step_history_run_seq", "run_id", "seq"),
)

# Steps waiting for outside events and the signals sent to runs (`state.waits`, migration 0010):
# a wait's deadline is durable, a signal is kept until a step consumes it, each event once a run.
run_waits = Table(
    "run_waits",
    metadata,
    Column("run_id", String(100), primary_key=True),
    Column("step_id", String(300), primary_key=True),
    Column("event", String(200), nullable=False),
    Column("node", Integer, nullable=False),
    Column("items", JSONB, nullable=False),
    Column("armed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("deadline", DateTime(timezone=True)),
    Column("resolution", String(20)),
    Column("resolved_at", DateTime(timezone=True)),
    Index("ix_run_waits_deadline", "deadline", postgresql_where=text("resolution IS NULL AND deadline IS NOT NULL")),
    UniqueConstraint("run_id", "event", name="uq_run_waits_event"),
)

run_signals = Table(
    "run_signals",
    metadata,
    Column("run_id", String(100), primary_key=True),
    Column("event", String(200), primary_key=True),
    Column("payload", JSONB),
    Column("sensitivity", String(20), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("consumed_by", String(300)),
)

# Values stored once by reference (`state.blobs`, migration 0011): the claim checks contexts hold,
# and which runs hold each (prune deletes a blob no kept run holds).
blobs = Table(
    "blobs",
    metadata,
    Column("blob_id", String(100), primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

blob_refs = Table(
    "blob_refs",
    metadata,
    Column("run_id", String(100), primary_key=True),
    Column("blob_id", String(100), primary_key=True),
    Index("ix_blob_refs_blob", "blob_id"),
)
