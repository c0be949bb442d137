"""A run's history: one row per version of each context and per event (`state.history`), written
by the write-behind in the same transaction as the snapshots. No change events: nobody caches it.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "step_history",
        sa.Column("entry_id", sa.String(400), primary_key=True),
        sa.Column("run_id", sa.String(100), nullable=False),
        sa.Column("context_id", sa.String(300), nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("step_id", sa.String(300), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("entry", JSONB, nullable=False),
        # The order of insertion: a reader that holds a run's history asks only for what came since.
        sa.Column("seq", sa.BigInteger, sa.Identity(always=True), nullable=False),
    )
    op.create_index("ix_step_history_run_seq", "step_history", ["run_id", "seq"])


def downgrade() -> None:
    op.drop_table("step_history")
