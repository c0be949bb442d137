"""Every run belongs to a deployment (RUNCTX_DEPLOYMENT, by default the key prefix): deployments
that share a database see only their own runs, and an idempotency key is unique within one.

Existing runs go to the deployment that migrates (its settings' `deployment_name`): the runs of a
database shared before this revision were all made by whoever shared it.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from state.settings import get_settings

    op.add_column("runs", sa.Column("deployment", sa.String(200), nullable=False, server_default=get_settings().deployment_name))
    op.alter_column("runs", "deployment", server_default=None)
    op.drop_constraint("uq_runs_idempotency_key", "runs")
    op.create_unique_constraint("uq_runs_deployment_idempotency_key", "runs", ["deployment", "idempotency_key"])
    op.create_index("ix_runs_deployment_status", "runs", ["deployment", "status"])


def downgrade() -> None:
    op.drop_index("ix_runs_deployment_status", "runs")
    op.drop_constraint("uq_runs_deployment_idempotency_key", "runs")
    op.create_unique_constraint("uq_runs_idempotency_key", "runs", ["idempotency_key"])
    op.drop_column("runs", "deployment")
