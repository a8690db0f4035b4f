"""Retrying parked events on SQLite and PostgreSQL: after a fix the held
deal's read models equal a clean projection's, and two retries at once
apply every event once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from metrics.answers import RetryAnswer
from metrics.parked import retry
from metrics.processes import load_catalog
from metrics.projection import lock_batches
from metrics.settings import Settings
from metrics.storage import create_engine, migrate
from tests.conftest import fresh_postgres_database
from tests.integration.metrics.scenario import scenario
from tests.unit.metrics import parking
from tests.unit.metrics.conftest import Projected
from tests.unit.metrics.parking import deploy_stage_changed_v2, dump
from tests.unit.metrics.streams import write_processes


@pytest.fixture
def clean(settings: Settings, tmp_path: Path) -> Iterator[Projected]:
    """A second, empty read model on the same kind of database."""
    databases: Iterator[str] | None = None
    if settings.resolved_database_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'clean.db'}"
    else:
        databases = fresh_postgres_database()
        url = next(databases)
    engine = create_engine(settings.model_copy(update={"database_url": url}))
    try:
        migrate(engine)
        yield Projected(engine, load_catalog(settings.processes_dir))
    finally:
        engine.dispose()
        if databases is not None:
            databases.close()


def scenario_with_newer_changes() -> list[dict[str, Any]]:
    """The seven deals of scenario.py, the stage changes of d1 and d4 after
    their creation written as schema_version 2: both deals are held from
    there on, the five others go on."""
    events = scenario()
    for deal in ("d1", "d4"):
        changes = [
            e
            for e in events
            if e["deal_id"] == deal
            and e["type"] == "stage.changed"
            and e["data"]["cause"] != "created"
        ]
        changes[0]["schema_version"] = 2
    return events


def test_a_fix_then_a_retry_gives_the_read_models_of_a_clean_projection(
    projected: Projected, clean: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = scenario_with_newer_changes()
    projected.apply(events, batch=7)
    held = projected.rows(
        "SELECT deal_id, count(*) FROM parked_events GROUP BY deal_id ORDER BY deal_id"
    )
    assert [deal for deal, _ in held] == ["d1", "d4"]
    assert (
        projected.rows(
            "SELECT deal_id, parked FROM deals WHERE parked > 0 ORDER BY deal_id"
        )
        == held
    )

    deploy_stage_changed_v2(monkeypatch)
    answer = retry(projected.engine, projected.catalog)

    assert answer.applied == sum(count for _, count in held)
    assert (answer.parked, answer.held, answer.missing) == (0, 0, 0)
    clean.apply(events, batch=7)
    assert dump(projected) == dump(clean)
    assert projected.rows("SELECT count(*) FROM parked_events") == [(0,)]


def test_a_retry_that_fails_again_keeps_the_event_and_its_deal_held(
    projected: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    projected.apply(scenario_with_newer_changes())
    before = dump(projected)
    stored = projected.rows(
        "SELECT id, error FROM parked_events WHERE deal_id = 'd4' ORDER BY id"
    )

    parking.deploy_broken_fix(monkeypatch)
    answer = retry(projected.engine, projected.catalog, deal="d4")

    assert [e.outcome for e in answer.events] == ["parked"] + ["held"] * (
        len(stored) - 1
    )
    error = answer.events[0].error
    assert error is not None and "/data/to: Field required" in error
    assert projected.rows(
        "SELECT id, error FROM parked_events WHERE deal_id = 'd4' ORDER BY id"
    ) == [(stored[0][0], error), *stored[1:]]
    assert dump(projected) == before


def applied_ids(answers: list[RetryAnswer]) -> list[int]:
    return sorted(e.id for a in answers for e in a.events if e.outcome == "applied")


def test_two_retries_at_once_apply_every_event_once(
    projected: Projected,
    clean: Projected,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = scenario_with_newer_changes()
    projected.apply(events)
    ids = parking.parked_ids(projected)
    deploy_stage_changed_v2(monkeypatch)
    # Two processes' worth: an API's engine and a command's writer engine.
    engines = [create_engine(settings), create_engine(settings, writer=True)]
    start = threading.Barrier(len(engines))
    answers: list[RetryAnswer] = []
    failures: list[BaseException] = []

    def run(engine: sa.Engine, ids: list[int] | None) -> None:
        try:
            start.wait(5)
            answers.append(retry(engine, projected.catalog, ids))
        except BaseException as error:
            failures.append(error)

    try:
        for wanted in ([ids[0]], None):  # the same event, then everything
            answers.clear()
            start.reset()
            threads = [
                threading.Thread(target=run, args=(engine, wanted))
                for engine in engines
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not failures
            outcomes = {e.outcome for a in answers for e in a.events}
            assert outcomes <= {"applied", "missing"}
            if wanted is not None:
                assert applied_ids(answers) == [ids[0]]
            else:
                assert applied_ids(answers) == ids[1:]
    finally:
        for engine in engines:
            engine.dispose()
    clean.apply(events)
    assert dump(projected) == dump(clean)


@pytest.mark.postgres
def test_on_postgresql_a_retry_waits_for_the_projector_batch_in_flight(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        database_url=postgres_url,
        processes_dir=write_processes(tmp_path / "processes"),
    )
    engine = create_engine(settings, writer=True)
    migrate(engine)
    projected = Projected(engine, load_catalog(settings.processes_dir))
    try:
        projected.apply(scenario_with_newer_changes())
        first = parking.parked_ids(projected)[0]
        deploy_stage_changed_v2(monkeypatch)
        answers: list[RetryAnswer] = []
        thread = threading.Thread(
            target=lambda: answers.append(retry(engine, projected.catalog, [first]))
        )
        with engine.connect() as batch, batch.begin():
            lock_batches(batch)  # as a projector batch does, until it commits
            thread.start()
            thread.join(1.0)
            assert thread.is_alive(), "the retry did not wait for the batch"
            assert first in parking.parked_ids(projected)
        thread.join(30)
        assert [(e.id, e.outcome) for e in answers[0].events] == [(first, "applied")]
    finally:
        engine.dispose()
