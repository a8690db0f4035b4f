"""The set-based writes give the same read models on SQLite and PostgreSQL,
whatever the batch size."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import make_dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from metrics.processes import load_catalog
from metrics.settings import Settings
from metrics.storage import create_engine, migrate
from metrics.writes import DEAL_COLUMNS, PostgresWrites
from tests.unit.metrics.conftest import Projected
from tests.unit.metrics.streams import STAGES, Log, write_processes


def _history(seed: int, deals: int) -> list[dict[str, Any]]:
    """Deals advancing, moved back by hand, lost, reopened, disqualified and
    meeting, their events interleaved; some arrive before deal.created."""
    rng = random.Random(seed)
    log = Log()
    for n in range(deals):
        deal, day = f"d{n:03d}", n / 4
        if n % 11 == 0:
            log.meeting(deal, day)  # before its deal.created
        log.create(deal, day, owner=f"rep{n % 3}", amount=100 * (n + 1))
    for step in range(deals * 4):
        deal = f"d{rng.randrange(deals):03d}"
        day = deals / 4 + step / 8
        stage = log._stage[deal]
        draw = rng.random()
        if stage in STAGES and draw < 0.45:
            nxt = STAGES.index(stage) + 1
            log.change(deal, STAGES[nxt] if nxt < len(STAGES) else "won", day)
        elif stage in STAGES and STAGES.index(stage) > 0 and draw < 0.55:
            log.override(deal, STAGES[STAGES.index(stage) - 1], day)
        elif stage in STAGES and draw < 0.62:
            log.lose(deal, day, rng.choice(["price", "timing"]))
        elif stage == "lost" and draw < 0.7:
            log.override(deal, "connecting", day, reason="reopened")
        elif stage in STAGES and draw < 0.66:
            log.disqualify(deal, day)
        elif draw < 0.8:
            log.add(deal, "deal.updated", day, {"owner": f"rep{rng.randrange(3)}"})
        else:
            log.meeting(deal, day, held=draw < 0.9)
    return log.events


def _dump(projected: Projected) -> tuple[list[Any], list[Any]]:
    return (
        projected.rows("SELECT * FROM deals ORDER BY deal_id"),
        projected.rows("SELECT * FROM stage_visits ORDER BY deal_id, seq"),
    )


@pytest.fixture
def sqlite_projected(tmp_path: Path) -> Iterator[Projected]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'reference.db'}",
        processes_dir=write_processes(tmp_path / "processes"),
    )
    engine = create_engine(settings, writer=True)
    migrate(engine)
    yield Projected(engine, load_catalog(settings.processes_dir))
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_postgresql_and_sqlite_project_the_same_read_models(
    sqlite_projected: Projected, postgres_url: str, tmp_path: Path, batch: int
) -> None:
    events = _history(seed=batch, deals=40)
    settings = Settings(
        database_url=postgres_url,
        processes_dir=write_processes(tmp_path / "pg-processes"),
    )
    engine = create_engine(settings, writer=True)
    migrate(engine)
    postgres = Projected(engine, load_catalog(settings.processes_dir))
    try:
        sqlite_projected.apply(events, batch=13)
        result = postgres.apply(events, batch=batch)
        assert (result.applied, result.skipped, result.parked) == (len(events), 0, 0)
        assert _dump(postgres) == _dump(sqlite_projected)

        # Delivered again: every event is skipped and nothing changes.
        again = postgres.apply(events, batch=batch)
        assert (again.applied, again.skipped) == (0, len(events))
        assert _dump(postgres) == _dump(sqlite_projected)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_value_too_long_for_its_column_fails_instead_of_being_cut(
    postgres_url: str,
) -> None:
    engine = sa.create_engine(postgres_url)
    migrate(engine)
    row = dict.fromkeys(DEAL_COLUMNS, 0)
    row.update(
        deal_id="x" * 129,
        process=None,
        owner=None,
        currency=None,
        status="pending",
        stage=None,
        outcome_reason=None,
    )
    record = make_dataclass("Row", DEAL_COLUMNS)(**row)
    try:
        with engine.begin() as connection, pytest.raises(sa.exc.DataError):
            PostgresWrites().insert_deals(connection, [record])
        with engine.connect() as connection:
            count = connection.execute(sa.text("SELECT count(*) FROM deals"))
            assert count.scalar_one() == 0
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_replicas_migrating_a_fresh_database_at_once_all_start(
    postgres_url: str, tmp_path: Path
) -> None:
    import threading

    settings = Settings(
        database_url=postgres_url, processes_dir=write_processes(tmp_path / "p")
    )
    engines = [create_engine(settings) for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    failures: list[BaseException] = []

    def start(engine: sa.Engine) -> None:
        barrier.wait()
        try:
            migrate(engine)
        except BaseException as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with engines[0].connect() as connection:
        versions = connection.exec_driver_sql(
            "SELECT version_num FROM metrics_alembic_version"
        ).all()
    for engine in engines:
        engine.dispose()
    assert failures == []
    assert len(versions) == 1
