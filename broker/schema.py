"""Schema versions with Alembic: ``rigshift broker migrate`` and the start-up check.

A broker starting on an empty database creates the schema by running every
migration; on a database whose schema is older than this broker's it refuses
to start and says to run ``rigshift broker migrate --db URL`` first.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from broker.errors import FailedPrecondition

__all__ = ["SchemaOutOfDate", "alembic_config", "current_revision", "ensure_schema", "migrate"]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = 0x52494753  # "RIGS": the advisory lock key migrations hold on PostgreSQL


class SchemaOutOfDate(FailedPrecondition):
    """The database schema is not the one this broker was built for."""

    default_reason = "SCHEMA_OUT_OF_DATE"


def alembic_config(url: str) -> Config:
    """An Alembic Config pointing at the broker's migrations and this database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest migration this code knows."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision stamped in the database, or None for an unversioned one."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (default: the newest)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Several brokers (or a migration Job) may start at once: one migrates, the
            # others wait here and then find the schema at head (upgrade is then a no-op).
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def ensure_schema(engine: Engine) -> None:
    """Create the schema in an empty database; refuse one at another revision."""
    tables = set(inspect(engine).get_table_names())
    if not tables - {"alembic_version"}:
        migrate(engine)
        return
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at revision {current or 'none (unversioned)'}, this broker "
            f"needs {head}: run `rigshift broker migrate --db URL` first",
            metadata={"current": str(current), "head": head},
        )
