"""A stored routine version is identified by its content hash: computed by the database for every
inserted version (by runctx or by plain SQL), so the same definition is one version.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("routines", sa.Column("content_hash", sa.String(64)))
    op.execute(
        """
        CREATE FUNCTION runctx_routine_hash() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          NEW.content_hash := encode(sha256(convert_to(NEW.definition::text, 'UTF8')), 'hex');
          RETURN NEW;
        END $$
        """
    )
    op.execute("CREATE TRIGGER routines_hash BEFORE INSERT ON routines FOR EACH ROW EXECUTE FUNCTION runctx_routine_hash()")
    # Versions stored before: hashed once (the immutability trigger refuses UPDATEs, so it steps aside).
    op.execute("ALTER TABLE routines DISABLE TRIGGER routines_immutable")
    op.execute("UPDATE routines SET content_hash = encode(sha256(convert_to(definition::text, 'UTF8')), 'hex')")
    op.execute("ALTER TABLE routines ENABLE TRIGGER routines_immutable")
    op.create_index("ix_routines_name_hash", "routines", ["name", "content_hash"])


def downgrade() -> None:
    op.drop_index("ix_routines_name_hash", "routines")
    op.execute("DROP TRIGGER routines_hash ON routines")
    op.execute("DROP FUNCTION runctx_routine_hash()")
    op.drop_column("routines", "content_hash")
