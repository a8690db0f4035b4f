"""Fixtures of the metrics unit tests: a migrated SQLite read model and the
projection over it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from metrics.processes import Catalog, load_catalog
from metrics.progress import FeedProgress
from metrics.projection import BatchResult, Incoming, Projection
from metrics.settings import Settings
from metrics.storage import create_engine, migrate
from tests.unit.metrics.streams import write_processes


class Projected:
    """A read model and the means to feed it."""

    def __init__(self, engine: sa.Engine, catalog: Catalog) -> None:
        self.engine = engine
        self.catalog = catalog
        self.projection = Projection(engine, catalog)
        self.progress = FeedProgress(engine, "http://feed.test")

    def apply(self, values: Sequence[Any], batch: int = 1000) -> BatchResult:
        total = BatchResult()
        for start in range(0, len(values), batch):
            chunk = values[start : start + batch]
            expected = self.progress.stored()
            positions = [
                v["position"]
                for v in chunk
                if isinstance(v, dict) and isinstance(v.get("position"), int)
            ]
            next_after = max([expected or 0, *positions])
            result = self.projection.apply(
                [Incoming(v, source="feed") for v in chunk],
                self.progress.writer(expected, next_after),
            )
            total.applied += result.applied
            total.skipped += result.skipped
            total.parked += result.parked
        return total

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        with self.engine.connect() as connection:
            return [tuple(r) for r in connection.execute(sa.text(query))]


@pytest.fixture
def processes_dir(tmp_path: Path) -> Path:
    return write_processes(tmp_path / "processes")


@pytest.fixture
def settings(tmp_path: Path, processes_dir: Path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'metrics.db'}",
        processes_dir=processes_dir,
    )


@pytest.fixture
def projected(settings: Settings) -> Iterator[Projected]:
    engine = create_engine(settings, writer=True)
    migrate(engine)
    yield Projected(engine, load_catalog(settings.processes_dir))
    engine.dispose()
