"""Epochs: a run's lineage number, raised by every rewind, and the epoch of each stored context.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("epoch", sa.BigInteger, nullable=False, server_default="1"))
    op.add_column("context_snapshots", sa.Column("epoch", sa.BigInteger, nullable=False, server_default="1"))
    op.create_index("ix_runs_status", "runs", ["status"])


def downgrade() -> None:
    op.drop_index("ix_runs_status", "runs")
    op.drop_column("context_snapshots", "epoch")
    op.drop_column("runs", "epoch")
