"""Initial schema: routines, configurations, runs, context snapshots, blackboard, exports; change events.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Every committed change to a routine, configuration or context sends a NOTIFY after commit,
# also when it is made by plain SQL outside runctx. runctx marks its own transactions with
# the setting runctx.origin so that listeners can tell the two apart.
NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION runctx_notify_change() RETURNS trigger AS $$
DECLARE
  rec record;
  change_key text;
BEGIN
  IF TG_OP = 'DELETE' THEN rec := OLD; ELSE rec := NEW; END IF;
  IF TG_TABLE_NAME = 'routines' THEN
    change_key := 'routine:' || rec.name;
  ELSIF TG_TABLE_NAME = 'configurations' THEN
    change_key := 'config:' || rec.kind || ':' || rec.name;
  ELSE
    change_key := 'context:' || rec.context_id;
  END IF;
  PERFORM pg_notify('runctx_changes', json_build_object(
    'table', TG_TABLE_NAME, 'op', TG_OP, 'key', change_key, 'version', rec.version,
    'origin', coalesce(current_setting('runctx.origin', true), ''), 'txid', txid_current())::text);
  RETURN NULL;
END $$ LANGUAGE plpgsql;
"""

# A plain-SQL UPDATE that leaves the version alone still makes a new version, so caches
# holding the old one see that they are stale.
BUMP_FUNCTION = """
CREATE OR REPLACE FUNCTION runctx_bump_version() RETURNS trigger AS $$
BEGIN
  IF coalesce(current_setting('runctx.origin', true), '') <> 'runctx' AND NEW.version <= OLD.version THEN
    NEW.version := OLD.version + 1;
  END IF;
  NEW.updated_at := now();
  RETURN NEW;
END $$ LANGUAGE plpgsql;
"""


def upgrade() -> None:
    op.create_table(
        "routines",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("definition", JSONB, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "configurations",
        sa.Column("kind", sa.String(50), primary_key=True),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("data", JSONB, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(100), primary_key=True),
        sa.Column("routine_name", sa.String(200), nullable=False),
        sa.Column("routine_version", sa.Integer),
        sa.Column("root_context_id", sa.String(300), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("meta", JSONB, nullable=False, server_default="{}"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "context_snapshots",
        sa.Column("context_id", sa.String(300), primary_key=True),
        sa.Column("run_id", sa.String(100), nullable=False),
        sa.Column("parent_id", sa.String(300)),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("document", JSONB, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_context_snapshots_run_id", "context_snapshots", ["run_id"])
    op.create_table(
        "blackboard_entries",
        sa.Column("scope", sa.String(200), primary_key=True),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("value", JSONB),
        sa.Column("sensitivity", sa.String(20), nullable=False),
        sa.Column("run_id", sa.String(100), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False, server_default="1"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "exports",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(100), nullable=False),
        sa.Column("variable", sa.String(200), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("scope", sa.String(200), nullable=False),
        sa.Column("value", JSONB),
        sa.Column("sensitivity", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("run_id", "key", "scope", name="uq_exports_run_key_scope"),
    )
    op.create_index("ix_exports_run_id", "exports", ["run_id"])
    op.execute(NOTIFY_FUNCTION)
    op.execute(BUMP_FUNCTION)
    for table in ("routines", "configurations", "context_snapshots"):
        op.execute(
            f"CREATE TRIGGER {table}_notify AFTER INSERT OR UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION runctx_notify_change()"
        )
    for table in ("configurations", "context_snapshots"):
        op.execute(
            f"CREATE TRIGGER {table}_bump BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION runctx_bump_version()"
        )


def downgrade() -> None:
    for table in ("exports", "blackboard_entries", "context_snapshots", "runs", "configurations", "routines"):
        op.drop_table(table)
    op.execute("DROP FUNCTION IF EXISTS runctx_notify_change()")
    op.execute("DROP FUNCTION IF EXISTS runctx_bump_version()")
