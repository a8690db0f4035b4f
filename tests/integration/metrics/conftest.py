"""Fixtures of the metrics integration tests: a read model on the database
of the `database_url` fixture (SQLite and PostgreSQL) and the API over it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from metrics.api import create_app
from metrics.processes import load_catalog
from metrics.settings import Settings
from metrics.storage import create_engine, migrate
from tests.unit.metrics.conftest import Projected
from tests.unit.metrics.streams import write_processes


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        processes_dir=write_processes(tmp_path / "processes"),
        kafka_bootstrap="127.0.0.1:1",
    )


@pytest.fixture
def projected(settings: Settings) -> Iterator[Projected]:
    engine = create_engine(settings, writer=True)
    migrate(engine)
    yield Projected(engine, load_catalog(settings.processes_dir))
    engine.dispose()


@pytest.fixture
def client(settings: Settings, projected: Projected) -> Iterator[TestClient]:
    with TestClient(create_app(settings, projected.catalog)) as test_client:
        yield test_client
