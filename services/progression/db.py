"""Engines and migrations for the progression service's database.

Two databases are supported: SQLite files (the embedded default) and
PostgreSQL through psycopg 3 (production). `create_engine` sets each up the
way the event log relies on; `migrate` brings a database to the newest
schema with Alembic, configured in code so that it works from any working
directory and from an installed package.
"""

from __future__ import annotations

__all__ = [
    "MIGRATIONS",
    "alembic_config",
    "comparison_options",
    "create_engine",
    "current_revision",
    "deferred",
    "migrate",
    "schema_differences",
]

import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event

from progression.errors import ConfigurationError, StorageUnavailable
from progression.tables import metadata

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

SQLITE_BUSY_TIMEOUT_MS = 30_000
POOL_SIZE = 10
POOL_MAX_OVERFLOW = 20
POOL_RECYCLE_S = 1_800

# Serialises concurrent `migrate` calls on PostgreSQL (several replicas
# starting at once). The value only has to differ from the other advisory
# lock keys of this database; see eventlog.COMMIT_ORDER_LOCK.
MIGRATION_LOCK = 0x6465_616C_6D69_6772  # "dealmigr"

# Execution option read by the SQLite "begin" hook: a transaction opened on an
# engine or connection carrying it starts with a plain (deferred) BEGIN.
_DEFERRED_BEGIN = "dealledger_deferred_begin"


def create_engine(url: str) -> sa.Engine:
    """An engine for `url`, set up for the event log (SQLite or PostgreSQL)."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as error:
        raise ConfigurationError(f"not a database URL: {error}") from error

    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed)
    if backend == "postgresql":
        if parsed.drivername in {"postgresql", "postgres"}:
            parsed = parsed.set(drivername="postgresql+psycopg")
        return sa.create_engine(
            parsed,
            pool_size=POOL_SIZE,
            max_overflow=POOL_MAX_OVERFLOW,
            pool_pre_ping=True,
            pool_recycle=POOL_RECYCLE_S,
        )
    raise ConfigurationError(
        f"unsupported database {backend!r}: use sqlite:/// or postgresql+psycopg://"
    )


def _sqlite_engine(url: sa.URL) -> sa.Engine:
    """SQLite in WAL mode whose transactions queue for the write lock.

    pysqlite's own transaction handling is switched off and SQLAlchemy's
    "begin" hook emits the BEGIN itself (the recipe of SQLAlchemy's SQLite
    dialect documentation). Transactions start with BEGIN IMMEDIATE, which
    takes the database's single write lock up front and waits up to the busy
    timeout for it, so concurrent writers queue instead of failing when a
    read transaction tries to become a write transaction. Reads that never
    write use `deferred(engine)`, whose transactions take no write lock and,
    under WAL, run alongside a writer.
    """
    memory = url.database in (None, "", ":memory:") or (
        url.query.get("mode") == "memory"
    )
    options: dict[str, Any] = {}
    if not memory:
        options = {"pool_size": POOL_SIZE, "max_overflow": POOL_MAX_OVERFLOW}
    engine = sa.create_engine(url, **options)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        if connection.get_execution_options().get(_DEFERRED_BEGIN):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def deferred(engine: sa.Engine) -> sa.Engine:
    """The same engine, whose SQLite transactions do not take the write lock.

    For read-only work. On PostgreSQL the option is ignored.
    """
    return engine.execution_options(**{_DEFERRED_BEGIN: True})


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """Alembic's configuration for this package's migrations, built in code."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migrate(url_or_engine: str | sa.Engine) -> None:
    """Bring the database to the newest schema; a no-op when it is there."""
    if isinstance(url_or_engine, str):
        engine, own_engine = create_engine(url_or_engine), True
    else:
        engine, own_engine = url_or_engine, False
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"),
                    {"key": MIGRATION_LOCK},
                )
            before = MigrationContext.configure(connection).get_current_revision()
            command.upgrade(alembic_config(connection), "head")
            after = MigrationContext.configure(connection).get_current_revision()
    except sa.exc.OperationalError as error:
        raise StorageUnavailable(f"cannot migrate the database: {error}") from error
    finally:
        if own_engine:
            engine.dispose()

    if before == after:
        logger.info("schema up to date revision=%s", after)
    else:
        logger.info("schema migrated from_revision=%s to_revision=%s", before, after)


def current_revision(engine: sa.Engine) -> str | None:
    """The Alembic revision the database is at; None before the first migration."""
    try:
        with deferred(engine).connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except sa.exc.OperationalError as error:
        raise StorageUnavailable(f"cannot read the schema revision: {error}") from error


def schema_differences(engine: sa.Engine) -> list[Any]:
    """What Alembic finds between the database's schema and `tables.metadata`.

    Empty when the migrations and the tables agree. Uses the same comparison
    settings as the migration environment's autogenerate.
    """
    with deferred(engine).connect() as connection:
        context = MigrationContext.configure(
            connection, opts=comparison_options(connection.dialect.name)
        )
        return list(compare_metadata(context, metadata))


def comparison_options(dialect_name: str) -> dict[str, Any]:
    """Alembic's autogenerate settings for this schema on the given database."""
    if dialect_name == "sqlite":
        return {"compare_type": True, "compare_server_default": _compare_sqlite_default}
    return {"compare_type": True, "compare_server_default": True}


def _compare_sqlite_default(
    context: MigrationContext,
    inspected_column: sa.Column[Any],
    metadata_column: sa.Column[Any],
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    # SQLite has no identity columns: there the position is INTEGER PRIMARY KEY
    # AUTOINCREMENT, which reflection cannot report as the metadata's
    # Identity(). False says "no difference"; None lets Alembic compare.
    # (Only for SQLite: on PostgreSQL, Alembic cannot hand a reflected
    # identity to a comparison function.)
    if isinstance(metadata_default, sa.Identity):
        return False
    return None
