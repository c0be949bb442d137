"""A context's row that is inserted is new: no process can hold a copy of it to drop, so its insert
sends no change event (updates and deletes still do). A fan-out inserts its items' contexts in one
statement; an event per row made that statement ten times slower and woke every worker process
once per item.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _notify_on(events: str) -> None:
    op.execute("DROP TRIGGER IF EXISTS context_snapshots_notify ON context_snapshots")
    op.execute(
        f"CREATE TRIGGER context_snapshots_notify AFTER {events} ON context_snapshots "
        "FOR EACH ROW EXECUTE FUNCTION runctx_notify_change()"
    )


def upgrade() -> None:
    _notify_on("UPDATE OR DELETE")


def downgrade() -> None:
    _notify_on("INSERT OR UPDATE OR DELETE")
