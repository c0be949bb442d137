"""Change events carry the changed row's identifying columns; Python names them (`state.keys`).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The same trigger function as in 0001, but the payload's "ident" holds the row's key columns
# (routines: [name], configurations: [kind, name], context_snapshots: [context_id]) instead of
# a cache key spelled in SQL: key names are built in one place, `state/keys.py`.
NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION runctx_notify_change() RETURNS trigger AS $$
DECLARE
  rec record;
  ident json;
BEGIN
  IF TG_OP = 'DELETE' THEN rec := OLD; ELSE rec := NEW; END IF;
  IF TG_TABLE_NAME = 'routines' THEN
    ident := json_build_array(rec.name);
  ELSIF TG_TABLE_NAME = 'configurations' THEN
    ident := json_build_array(rec.kind, rec.name);
  ELSE
    ident := json_build_array(rec.context_id);
  END IF;
  PERFORM pg_notify('runctx_changes', json_build_object(
    'table', TG_TABLE_NAME, 'op', TG_OP, 'ident', ident, 'version', rec.version,
    'origin', coalesce(current_setting('runctx.origin', true), ''), 'txid', txid_current())::text);
  RETURN NULL;
END $$ LANGUAGE plpgsql;
"""

PREVIOUS_FUNCTION = """
CREATE OR REPLACE FUNCTION runctx_notify_change() RETURNS trigger AS $$
DECLARE
  rec record;
  change_key text;
BEGIN
  IF TG_OP = 'DELETE' THEN rec := OLD; ELSE rec := NEW; END IF;
  IF TG_TABLE_NAME = 'routines' THEN
    change_key := 'routine:' || rec.name;
  ELSIF TG_TABLE_NAME = 'configurations' THEN
    change_key := 'config:' || rec.kind || ':' || rec.name;
  ELSE
    change_key := 'context:' || rec.context_id;
  END IF;
  PERFORM pg_notify('runctx_changes', json_build_object(
    'table', TG_TABLE_NAME, 'op', TG_OP, 'key', change_key, 'version', rec.version,
    'origin', coalesce(current_setting('runctx.origin', true), ''), 'txid', txid_current())::text);
  RETURN NULL;
END $$ LANGUAGE plpgsql;
"""


def upgrade() -> None:
    op.execute(NOTIFY_FUNCTION)


def downgrade() -> None:
    op.execute(PREVIOUS_FUNCTION)
