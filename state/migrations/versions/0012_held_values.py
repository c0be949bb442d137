"""A context's large values held once per run beside its snapshot, and large columns compressed with lz4.

`context_values` holds each large plain value of a run's contexts once, by its digest; a snapshot
(and so each write-behind) carries a small document that names them, so a flush writes only the
values that changed (`state.tiers.postgres.held`).

lz4 where the server has it: what a context, a history entry or a blob holds is compressed when
written (TOAST), and pglz, the default, costs several times lz4's time on the critical path of a
submit and of every write-behind. A server built without lz4 keeps pglz.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

COMPRESSED = (("context_snapshots", "document"), ("step_history", "entry"), ("blobs", "data"), ("context_values", "value"))


def _has_lz4() -> bool:
    found = op.get_bind().execute(sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")).scalar()
    return bool(found) and "lz4" in found


def upgrade() -> None:
    op.create_table(
        "context_values",
        sa.Column("run_id", sa.String(100), primary_key=True),
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("value", JSONB, nullable=False),
    )
    if _has_lz4():
        for table, column in COMPRESSED:
            op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION lz4")


def downgrade() -> None:
    if _has_lz4():
        for table, column in COMPRESSED[:-1]:
            op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION pglz")
    op.drop_table("context_values")
