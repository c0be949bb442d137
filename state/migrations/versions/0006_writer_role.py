"""runctx's own transactions are told apart by a role, not by a setting any session can make.

Change events and the version bump of plain-SQL edits ask ``runctx_own_transaction()``: true when
the transaction runs as the role ``runctx_writer`` (runctx's store does ``SET LOCAL ROLE
runctx_writer``; only members of that role can, so a session of an operator's own user cannot).
Where the migrating user may not create roles, the role is not made and the old marker (the
``runctx.origin`` setting) stays in use.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

WRITER_ROLE = "runctx_writer"

OWN_TRANSACTION = f"""
CREATE OR REPLACE FUNCTION runctx_own_transaction() RETURNS boolean LANGUAGE sql STABLE AS $$
  SELECT CASE WHEN EXISTS (SELECT FROM pg_roles WHERE rolname = '{WRITER_ROLE}')
    THEN current_user = '{WRITER_ROLE}'
    ELSE coalesce(current_setting('runctx.origin', true), '') = 'runctx' END
$$;
"""

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
    'origin', CASE WHEN runctx_own_transaction() THEN 'runctx' ELSE '' END, 'txid', txid_current())::text);
  RETURN NULL;
END $$ LANGUAGE plpgsql;
"""

BUMP_FUNCTION = """
CREATE OR REPLACE FUNCTION runctx_bump_version() RETURNS trigger AS $$
BEGIN
  IF NOT runctx_own_transaction() AND NEW.version <= OLD.version THEN
    NEW.version := OLD.version + 1;
  END IF;
  NEW.updated_at := now();
  RETURN NEW;
END $$ LANGUAGE plpgsql;
"""

MAKE_ROLE = f"""
DO $$
BEGIN
  BEGIN
    CREATE ROLE {WRITER_ROLE} NOLOGIN;
  EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;  -- made by another database's migration
  END;
  EXECUTE format('GRANT {WRITER_ROLE} TO %I', current_user);
  GRANT ALL ON ALL TABLES IN SCHEMA public TO {WRITER_ROLE};
  GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {WRITER_ROLE};
  ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO {WRITER_ROLE};
  ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO {WRITER_ROLE};
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'runctx: no role {WRITER_ROLE} (this user may not create roles); transactions stay marked by a setting';
END $$;
"""


def upgrade() -> None:
    op.execute(MAKE_ROLE)
    op.execute(OWN_TRANSACTION)
    op.execute(NOTIFY_FUNCTION)
    op.execute(BUMP_FUNCTION)


def downgrade() -> None:
    from importlib import import_module

    previous = import_module("state.migrations.versions.0002_change_event_fields")
    op.execute(previous.NOTIFY_FUNCTION)
    first = import_module("state.migrations.versions.0001_initial")
    op.execute(first.BUMP_FUNCTION)
    op.execute("DROP FUNCTION runctx_own_transaction()")
