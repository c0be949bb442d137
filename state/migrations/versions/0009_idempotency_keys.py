"""A submit's idempotency key: unique among the runs kept (a pruned run frees it), with a keyed
digest of what that submit asked for (routine and variables), to tell a repeat from a misuse.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("idempotency_key", sa.String(200), nullable=True))
    op.add_column("runs", sa.Column("request_digest", sa.String(100), nullable=True))
    op.create_unique_constraint("uq_runs_idempotency_key", "runs", ["idempotency_key"])


def downgrade() -> None:
    op.drop_constraint("uq_runs_idempotency_key", "runs")
    op.drop_column("runs", "request_digest")
    op.drop_column("runs", "idempotency_key")
