"""The read-model database: engines and migrations.

SQLite (the embedded default) runs in WAL mode with a busy timeout; the
projector's transactions take the write lock up front (`BEGIN IMMEDIATE`)
so that two writers wait for each other instead of failing on a lock
upgrade. PostgreSQL is used through psycopg 3.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from metrics.errors import ConfigurationError
from metrics.settings import Settings

__all__ = ["create_engine", "migrate", "normalise_url"]

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "metrics_alembic_version"
_MIGRATION_LOCK = 0x6D6574726963_6D67  # "metric" "mg"


def normalise_url(url: str) -> sa.URL:
    """Parse a database URL; a bare `postgresql://` means psycopg 3."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigurationError(
            "METRICS_DATABASE_URL: not a SQLAlchemy database URL"
        ) from None
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in {"sqlite", "postgresql"}:
        raise ConfigurationError(
            f"METRICS_DATABASE_URL: backend {parsed.get_backend_name()!r} is "
            "not supported (use sqlite or postgresql+psycopg)"
        )
    return parsed


def create_engine(
    settings: Settings,
    *,
    writer: bool = False,
    url: str | sa.URL | None = None,
    schema: str | None = None,
) -> sa.Engine:
    """An engine on the read-model database; `writer` for the projector.

    `url` points it at another database with the same settings (a rebuild's
    SQLite file); `schema` makes a PostgreSQL schema the only one its
    statements see, so the read models' unqualified names resolve there
    (a rebuild's fresh tables)."""
    if url is None:
        url = normalise_url(settings.resolved_database_url)
    elif isinstance(url, str):
        url = normalise_url(url)
    if url.get_backend_name() != "sqlite":
        connect_args = {}
        if schema is not None:
            connect_args["options"] = f"-c search_path={schema}"
        return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)

    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    busy_timeout_ms = settings.sqlite_busy_timeout_ms
    engine = sa.create_engine(
        url,
        connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event own transactions (the pysqlite driver
        # would otherwise begin them lazily and break SAVEPOINT).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    begin = "BEGIN IMMEDIATE" if writer else "BEGIN"

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql(begin)

    return engine


def migrate(engine: sa.Engine) -> None:
    """Bring the read-model schema to the latest migration."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # One migration at a time: replicas started together wait for
            # the first, then find the schema at the head. (On SQLite the
            # projector's BEGIN IMMEDIATE serialises them.)
            connection.exec_driver_sql(
                f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"
            )
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    logger.info(
        "read models migrated database=%s",
        engine.url.render_as_string(hide_password=True),
    )
