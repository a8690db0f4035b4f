"""Shared fixtures: the databases and the broker every storage test runs on.

Real services only. `make test` starts a throwaway PostgreSQL and Apache Kafka
and exports their addresses; anyone with their own can export them instead:

    DEALLEDGER_TEST_PG_URL=postgresql+psycopg://user@host:5432/db
    DEALLEDGER_TEST_KAFKA=host:9092

Without them a test that needs the service is skipped on a workstation and
fails in CI (CI=true), where a missing service is an error.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _missing(service: str, variable: str) -> None:
    message = f"{service} is not available: {variable} is not set"
    if IN_CI:
        pytest.fail(f"{message} (in CI a missing service is a failure)")
    pytest.skip(message)


def postgres_admin_url() -> str:
    url = os.environ.get("DEALLEDGER_TEST_PG_URL", "")
    if not url:
        _missing("PostgreSQL", "DEALLEDGER_TEST_PG_URL")
    return url


def fresh_postgres_database() -> Iterator[str]:
    """Create an empty PostgreSQL database for one test and drop it after."""
    admin_url = postgres_admin_url()
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(admin_url).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
    else:
        yield from fresh_postgres_database()


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    """The progression event log's database on `database_url`, migrated."""
    from progression.db import create_engine, migrate

    engine = create_engine(database_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """An empty PostgreSQL database, for tests that are about PostgreSQL."""
    yield from fresh_postgres_database()


@pytest.fixture
def kafka_bootstrap() -> str:
    """The address of a real Apache Kafka broker."""
    servers = os.environ.get("DEALLEDGER_TEST_KAFKA", "")
    if not servers:
        _missing("Apache Kafka", "DEALLEDGER_TEST_KAFKA")
    return servers
