"""Sealed values and immutable routines: the key ids in use, and no UPDATE of a stored routine version.

A stored routine version is what its runs started with: the database refuses to change one in place
(a new version, inserted by runctx or by plain SQL, reaches every worker as before). The ids of the
keys that sealed values are recorded, so that a process without one of them refuses to start
instead of failing on every read.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "encryption_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("first_used", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )
    op.execute(
        """
        CREATE FUNCTION runctx_routine_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          RAISE EXCEPTION 'routine % version % is immutable: store a new version instead', OLD.name, OLD.version
            USING ERRCODE = 'restrict_violation';
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER routines_immutable BEFORE UPDATE ON routines "
        "FOR EACH ROW EXECUTE FUNCTION runctx_routine_immutable()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER routines_immutable ON routines")
    op.execute("DROP FUNCTION runctx_routine_immutable()")
    op.drop_table("encryption_keys")
