"""Alembic, configured in code: no ``alembic.ini`` is needed or shipped.

The store calls :func:`upgrade_to_head` at start. Migrations run in one transaction under a lock
(``pg_advisory_xact_lock`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so several processes
starting at once on an empty database migrate it exactly once.

To write a new migration against a development database::

    from alembic import command
    from plaudit.services.feedback.migrate import alembic_config
    command.revision(alembic_config("sqlite:///dev.db"), "add x", autogenerate=True)
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from plaudit.services.feedback.db import normalize_url, write_transaction

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
VERSION_TABLE = "feedback_alembic_version"
_MIGRATION_LOCK_KEY = 0x706C6175_6669  # "plau" "fi": any constant shared by every process


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at this package's migrations (and at ``url`` if given)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        rendered = normalize_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(conn: Connection) -> str | None:
    """The revision the database is at (None before the first migration)."""
    return MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()


def upgrade_to_head(engine: Engine) -> None:
    """Bring the schema to the latest revision (a no-op when it is there already)."""
    with write_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
        if current_revision(conn) == head_revision():
            return
        config = alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
