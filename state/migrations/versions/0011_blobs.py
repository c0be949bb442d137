"""Values stored once by reference (claim checks): a context holds the reference, the value lives
here, and a run's references say which blobs a kept run still needs.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("blob_id", sa.String(100), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "blob_refs",
        sa.Column("run_id", sa.String(100), primary_key=True),
        sa.Column("blob_id", sa.String(100), primary_key=True),
    )
    op.create_index("ix_blob_refs_blob", "blob_refs", ["blob_id"])


def downgrade() -> None:
    op.drop_table("blob_refs")
    op.drop_table("blobs")
