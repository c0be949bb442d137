"""Steps waiting for outside events and the signals sent to runs: a wait's deadline survives
anything that happens to Redis or the workers; a signal is kept until a step consumes it.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_waits",
        sa.Column("run_id", sa.String(100), primary_key=True),
        sa.Column("step_id", sa.String(300), primary_key=True),
        sa.Column("event", sa.String(200), nullable=False),
        sa.Column("node", sa.Integer, nullable=False),
        sa.Column("items", JSONB, nullable=False),
        sa.Column("armed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("deadline", sa.DateTime(timezone=True)),
        sa.Column("resolution", sa.String(20)),
        sa.Column("resolved_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("run_id", "event", name="uq_run_waits_event"),
    )
    # The watchdog's scan for expired waits reads only the open ones with a deadline.
    op.create_index(
        "ix_run_waits_deadline", "run_waits", ["deadline"],
        postgresql_where=sa.text("resolution IS NULL AND deadline IS NOT NULL"),
    )
    op.create_table(
        "run_signals",
        sa.Column("run_id", sa.String(100), primary_key=True),
        sa.Column("event", sa.String(200), primary_key=True),
        sa.Column("payload", JSONB),
        sa.Column("sensitivity", sa.String(20), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("consumed_by", sa.String(300)),
    )


def downgrade() -> None:
    op.drop_table("run_signals")
    op.drop_table("run_waits")
