"""Retrying parked events: held deals applied in order after a fix, exactly
once, or kept parked with the new error (SQLite; the integration tests run
the same on PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metrics import projection as projection_module
from metrics.envelope import parse_envelope
from metrics.errors import EventRejected, ProcessFileError
from metrics.parked import retry
from metrics.processes import Catalog, load_catalog
from metrics.settings import Settings
from metrics.storage import create_engine, migrate
from tests.unit.metrics import parking
from tests.unit.metrics.conftest import Projected
from tests.unit.metrics.parking import deploy_stage_changed_v2, dump, held_stream
from tests.unit.metrics.streams import FAST_TRACK, Log


@pytest.fixture
def clean(tmp_path: Path, processes_dir: Path) -> Iterator[Projected]:
    """A second, empty read model: where the stream is projected cleanly."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'clean.db'}", processes_dir=processes_dir
    )
    engine = create_engine(settings, writer=True)
    migrate(engine)
    yield Projected(engine, load_catalog(processes_dir))
    engine.dispose()


def outcomes(answer: Any) -> list[tuple[int, str]]:
    return [(event.id, event.outcome) for event in answer.events]


def test_after_a_code_fix_a_retry_applies_the_held_deal_like_a_clean_projection(
    projected: Projected, clean: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    events, first = held_stream()
    projected.apply(events, batch=4)
    ids = parking.parked_ids(projected)
    # The version-2 event and the six later events of d1 behind it.
    assert len(ids) == 7
    assert projected.rows("SELECT DISTINCT deal_id FROM parked_events") == [("d1",)]
    assert projected.rows("SELECT parked, status FROM deals WHERE deal_id = 'd1'") == [
        (7, "open")
    ]

    deploy_stage_changed_v2(monkeypatch)
    answer = retry(projected.engine, projected.catalog)

    assert outcomes(answer) == [(i, "applied") for i in ids]
    assert answer.events[0].event_id == first["event_id"]
    assert (answer.applied, answer.parked, answer.held, answer.missing) == (7, 0, 0, 0)
    assert parking.parked_ids(projected) == []
    clean.apply(events)
    assert dump(projected) == dump(clean)
    assert projected.rows(
        "SELECT stage, outcome FROM stage_visits WHERE deal_id = 'd1' ORDER BY seq"
    ) == [
        ("prospecting", "advanced"),
        ("connecting", "advanced"),
        ("researching", "moved_back"),
        ("connecting", "dropped"),
    ]
    assert projected.rows(
        "SELECT status, parked, meetings_held FROM deals WHERE deal_id = 'd1'"
    ) == [("lost", 0, 1)]


class StrictCatalog(Catalog):
    """Refuses to order the stages of a process no file declares.

    A stand-in for a process file whose absence makes the projection fail:
    today's `Catalog` answers "not ordered" instead (the visit counts as
    moved back and nothing is parked), so a process file missing alone
    never parks an event.
    """

    def is_later(
        self, process: str | None, version: int | None, a: str, b: str
    ) -> bool | None:
        if process is None or self.version(process, version) is None:
            raise ProcessFileError(f"process={process} is declared by no file")
        return super().is_later(process, version, a, b)


def strict(directory: Path) -> StrictCatalog:
    catalog = load_catalog(directory)
    return StrictCatalog(catalog.current(key) for key in catalog.keys)


def test_after_a_process_file_fix_a_retry_applies_the_held_deal(
    projected: Projected, clean: Projected, processes_dir: Path
) -> None:
    log = Log()
    log.create("d7", 0, process="fast-track", first_stage="qualify")
    log.override("d7", "quote", 1)
    log.lose("d7", 2, "timing")
    log.create("d1", 0)
    (processes_dir / "fast-track.yaml").unlink()
    projected.projection = projection_module.Projection(
        projected.engine, strict(processes_dir)
    )
    projected.apply(log.events)
    parked = projected.rows("SELECT event_type, error FROM parked_events ORDER BY id")
    assert [row[0] for row in parked] == ["stage.changed", "deal.lost", "stage.changed"]
    assert "ProcessFileError: process=fast-track" in parked[0][1]

    (processes_dir / "fast-track.yaml").write_text(FAST_TRACK)
    answer = retry(projected.engine, strict(processes_dir), deal="d7")

    assert (answer.applied, answer.parked) == (3, 0)
    clean.apply(log.events)
    assert dump(projected) == dump(clean)
    assert projected.rows(
        "SELECT stage, outcome FROM stage_visits WHERE deal_id = 'd7' ORDER BY seq"
    ) == [("qualify", "advanced"), ("quote", "dropped")]


def test_an_event_retried_twice_is_applied_once(
    projected: Projected, clean: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    events, _first = held_stream()
    projected.apply(events)
    first_id, *later = parking.parked_ids(projected)
    deploy_stage_changed_v2(monkeypatch)

    assert outcomes(retry(projected.engine, projected.catalog, [first_id])) == [
        (first_id, "applied")
    ]
    once = dump(projected)
    again = retry(projected.engine, projected.catalog, [first_id])
    assert outcomes(again) == [(first_id, "missing")]
    assert again.events[0].error == f"no parked event with id={first_id}"
    assert dump(projected) == once

    # The rest of the deal, retried by id, twice over in one call.
    rest = retry(projected.engine, projected.catalog, [*later, *later])
    assert outcomes(rest) == [(i, "applied") for i in later]
    clean.apply(events)
    assert dump(projected) == dump(clean)


def test_a_retry_that_fails_again_keeps_the_event_with_its_new_error(
    projected: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    events, _first = held_stream()
    projected.apply(events)
    before = dump(projected)
    stored = projected.rows("SELECT id, error FROM parked_events ORDER BY id")
    first_id = stored[0][0]
    assert "newer than this projector knows" in stored[0][1]

    parking.deploy_broken_fix(monkeypatch)
    answer = retry(projected.engine, projected.catalog)

    assert outcomes(answer) == [(first_id, "parked")] + [
        (i, "held") for i, _ in stored[1:]
    ]
    new_error = answer.events[0].error
    assert new_error is not None and "/data/to: Field required" in new_error
    assert f"held behind parked event id={first_id} " in str(answer.events[1].error)
    after = projected.rows("SELECT id, error FROM parked_events ORDER BY id")
    # Same ids; the first with the error of this retry, the held ones as they
    # were (they were not tried).
    assert after == [(first_id, new_error), *stored[1:]]
    assert dump(projected) == before


def test_retrying_a_held_event_is_refused_naming_the_earlier_one(
    projected: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    events, _first = held_stream()
    projected.apply(events)
    before = dump(projected)
    first_id, second_id, *_ = parking.parked_ids(projected)
    deploy_stage_changed_v2(monkeypatch)

    answer = retry(projected.engine, projected.catalog, [second_id])

    assert outcomes(answer) == [(second_id, "held")]
    assert f"held behind parked event id={first_id} " in str(answer.events[0].error)
    assert "retry that one first" in str(answer.events[0].error)
    assert second_id in parking.parked_ids(projected)
    assert dump(projected) == before
    # Both asked for: tried in stream order, whatever the order asked.
    both = retry(projected.engine, projected.catalog, [second_id, first_id])
    assert outcomes(both) == [(first_id, "applied"), (second_id, "applied")]


def test_a_retry_of_one_deal_leaves_the_other_deals_parked(
    projected: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Log()
    log.create("d1", 0)
    log.create("d2", 0)
    parking.newer_change(log, "d1", "connecting", 1)
    parking.newer_change(log, "d2", "connecting", 1)
    log.meeting("d2", 2)
    projected.apply(log.events)
    d1_ids = parking.parked_ids(projected, "d1")
    deploy_stage_changed_v2(monkeypatch)

    answer = retry(projected.engine, projected.catalog, deal="d2")
    assert (answer.applied, [e.deal_id for e in answer.events]) == (2, ["d2", "d2"])
    assert parking.parked_ids(projected) == d1_ids
    refused = retry(projected.engine, projected.catalog, d1_ids, deal="d2")
    assert outcomes(refused) == [(d1_ids[0], "missing")]
    assert refused.events[0].error == (
        f"parked event id={d1_ids[0]} is of deal d1, not d2: not retried"
    )
    assert projected.rows("SELECT deal_id, parked FROM deals ORDER BY deal_id") == [
        ("d1", 1),
        ("d2", 0),
    ]


def unreadable_until_fixed(
    monkeypatch: pytest.MonkeyPatch, event_id: str
) -> list[bool]:
    """A defect in reading envelopes: the envelope of `event_id` is refused
    while the returned flag is unset (set it: the fix is deployed)."""
    fixed = [False]

    def parse(raw: Any) -> Any:
        envelope = parse_envelope(raw)
        if envelope.event_id == event_id and not fixed[0]:
            raise EventRejected("envelope breaks its schema: (a defect)")
        return envelope

    monkeypatch.setattr(projection_module, "parse_envelope", parse)
    return fixed


def test_an_unreadable_envelope_fixed_applies_where_its_deal_is_not_past_it(
    projected: Projected, clean: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Log()
    log.create("d1", 0)
    meeting = log.add("d1", "meeting.held", 1)
    fixed = unreadable_until_fixed(monkeypatch, meeting["event_id"])
    projected.apply(log.events)
    assert projected.rows("SELECT deal_id, stream_version FROM parked_events") == [
        ("d1", None)
    ]

    fixed[0] = True
    answer = retry(projected.engine, projected.catalog)

    assert [e.outcome for e in answer.events] == ["applied"]
    clean.apply(log.events)
    assert dump(projected) == dump(clean)
    assert projected.rows("SELECT stream_version, meetings_held FROM deals") == [(3, 1)]


def test_an_unreadable_envelope_its_deal_moved_past_stays_parked_for_a_rebuild(
    projected: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Log()
    log.create("d1", 0)
    meeting = log.add("d1", "meeting.held", 1)
    log.meeting("d1", 2)
    fixed = unreadable_until_fixed(monkeypatch, meeting["event_id"])
    projected.apply([*log.events, b"{not json"])
    before = dump(projected)

    fixed[0] = True
    answer = retry(projected.engine, projected.catalog)

    assert [e.outcome for e in answer.events] == ["parked", "parked"]
    moved, garbage = (e.error or "" for e in answer.events)
    assert "deal d1 has moved past it" in moved and "rebuild" in moved
    assert "envelope breaks its schema" in garbage
    assert projected.rows("SELECT error FROM parked_events ORDER BY id") == [
        (moved,),
        (garbage,),
    ]
    assert dump(projected) == before  # the later meeting only, as before


def test_held_events_asked_for_alone_all_name_the_event_that_holds_them(
    projected: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    events, _first = held_stream()
    projected.apply(events)
    first_id, *later = parking.parked_ids(projected)
    deploy_stage_changed_v2(monkeypatch)

    answer = retry(projected.engine, projected.catalog, later[:3])

    assert outcomes(answer) == [(i, "held") for i in later[:3]]
    for event in answer.events:
        assert f"held behind parked event id={first_id} " in str(event.error)
