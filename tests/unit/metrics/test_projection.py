"""The projection, over hand-built event streams."""

from __future__ import annotations

import json
import logging

import pytest
import sqlalchemy as sa

from metrics.errors import OffsetConflict
from metrics.progress import KafkaOffsets
from metrics.projection import Incoming, Projection
from tests.unit.metrics.conftest import Projected
from tests.unit.metrics.streams import Log

DAY_US = 86_400_000_000
BASE_US = 1_735_689_600_000_000  # streams.BASE


def us(days: float) -> int:
    return BASE_US + round(days * DAY_US)


def visits(projected: Projected, deal: str) -> list[tuple[object, ...]]:
    return projected.rows(
        "SELECT stage, entered_us, left_us, left_to, outcome, left_reason "
        f"FROM stage_visits WHERE deal_id = '{deal}' ORDER BY seq"
    )


def test_a_deal_visits_its_stages_at_their_effective_times(
    projected: Projected,
) -> None:
    log = Log()
    log.create("d1", 0)
    log.advance_to("d1", "researching", 2)
    log.advance_to("d1", "won", 10)
    projected.apply(log.events)

    found = visits(projected, "d1")
    assert [row[0] for row in found] == [
        "prospecting",
        "connecting",
        "researching",
        "presenting",
        "negotiating",
        "closing",
    ]
    assert found[0][1:5] == (us(0), us(2), "connecting", "advanced")
    assert found[2][1:5] == (us(2), us(10), "presenting", "advanced")
    assert found[-1][3:5] == ("won", "advanced")
    assert projected.rows("SELECT status, closed_us FROM deals") == [("won", us(10))]


def test_an_event_delivered_twice_is_counted_once(projected: Projected) -> None:
    log = Log()
    log.create("d1", 0)
    log.meeting("d1", 1)
    log.advance_to("d1", "connecting", 2)
    events = log.events
    # Within one batch and again in a later batch.
    first = projected.apply([*events[:3], events[2], *events[3:]])
    second = projected.apply(events)

    assert first.applied == len(events) and first.skipped == 1
    assert second.applied == 0 and second.skipped == len(events)
    assert projected.rows("SELECT meetings_held, visit_count FROM deals") == [(1, 2)]
    assert projected.rows("SELECT count(*) FROM stage_visits") == [(2,)]


def test_the_batch_size_does_not_change_the_read_models(
    projected: Projected, settings: object
) -> None:
    log = Log()
    for n in range(6):
        log.create(f"d{n}", n, owner=f"rep{n % 2}", amount=1000 * n)
    for n in range(6):
        log.advance_to(f"d{n}", "presenting", 10 + n)
    log.lose("d1", 20)
    log.override("d2", "connecting", 21)
    log.meeting("d3", 22)

    projected.apply(log.events, batch=1000)
    whole = projected.rows("SELECT * FROM stage_visits ORDER BY deal_id, seq")
    deals_whole = projected.rows(
        "SELECT deal_id, stream_version, status, stage, owner, amount_micros, "
        "meetings_held FROM deals ORDER BY deal_id"
    )
    with projected.engine.begin() as connection:
        for table in ("stage_visits", "deals", "feed_position"):
            connection.execute(sa.text(f"DELETE FROM {table}"))
    projected.apply(log.events, batch=3)

    assert projected.rows("SELECT * FROM stage_visits ORDER BY deal_id, seq") == whole
    assert (
        projected.rows(
            "SELECT deal_id, stream_version, status, stage, owner, amount_micros, "
            "meetings_held FROM deals ORDER BY deal_id"
        )
        == deals_whole
    )


def test_a_visit_left_for_lost_counts_as_dropped_by_its_reason(
    projected: Projected,
) -> None:
    log = Log()
    log.create("d1", 0)
    log.advance_to("d1", "connecting", 1)
    log.lose("d1", 4, reason="chose_competitor")
    projected.apply(log.events)

    assert visits(projected, "d1")[-1] == (
        "connecting",
        us(1),
        us(4),
        "lost",
        "dropped",
        "chose_competitor",
    )
    assert projected.rows("SELECT status, outcome_reason FROM deals") == [
        ("lost", "chose_competitor")
    ]


def test_an_override_to_an_earlier_stage_is_a_move_back_not_an_advance(
    projected: Projected,
) -> None:
    log = Log()
    log.create("d1", 0)
    log.advance_to("d1", "researching", 1)
    log.override("d1", "connecting", 3)
    log.advance_to("d1", "researching", 5)
    projected.apply(log.events)

    found = visits(projected, "d1")
    assert [(row[0], row[4]) for row in found] == [
        ("prospecting", "advanced"),
        ("connecting", "advanced"),
        ("researching", "moved_back"),
        ("connecting", "advanced"),
        ("researching", None),
    ]
    assert projected.rows("SELECT criteria_changes, other_changes FROM deals") == [
        (3, 1)
    ]


def test_an_override_to_a_later_stage_counts_as_an_advance(
    projected: Projected,
) -> None:
    log = Log()
    log.create("d1", 0)
    log.override("d1", "presenting", 2)
    projected.apply(log.events)

    assert [(row[0], row[4]) for row in visits(projected, "d1")] == [
        ("prospecting", "advanced"),
        ("presenting", None),
    ]


def test_an_override_reopens_a_lost_deal(projected: Projected) -> None:
    log = Log()
    log.create("d1", 0)
    log.lose("d1", 2)
    log.override("d1", "connecting", 3)
    projected.apply(log.events)

    assert projected.rows("SELECT status, stage, closed_us FROM deals") == [
        ("open", "connecting", None)
    ]
    assert [(row[0], row[4]) for row in visits(projected, "d1")] == [
        ("prospecting", "dropped"),
        ("connecting", None),
    ]


def test_owner_and_amount_follow_the_latest_update_in_stream_order(
    projected: Projected,
) -> None:
    log = Log()
    log.create("d1", 5, owner="ana", amount=100)
    log.add("d1", "deal.updated", 4, {"owner": "bo"})  # earlier occurred_at
    log.add("d1", "deal.updated", 3, {"amount": 250.5, "currency": "USD"})
    projected.apply(log.events)

    assert projected.rows("SELECT owner, amount_micros, currency FROM deals") == [
        ("bo", 250_500_000, "USD")
    ]


def test_the_first_meeting_is_the_earliest_held_one(projected: Projected) -> None:
    log = Log()
    log.create("d1", 0)
    log.meeting("d1", 6)
    log.meeting("d1", 2)  # arrives later, happened earlier
    log.meeting("d1", 3, held=False)
    projected.apply(log.events)

    assert projected.rows(
        "SELECT first_meeting_us, meetings_held, meetings_no_show FROM deals"
    ) == [(us(2), 2, 1)]


def test_events_before_deal_created_are_kept_until_it_arrives(
    projected: Projected,
) -> None:
    log = Log()
    log.meeting("d1", 1)
    projected.apply(log.events)
    assert projected.rows("SELECT status, created_us, meetings_held FROM deals") == [
        ("pending", None, 1)
    ]
    log.create("d1", 2)
    projected.apply(log.events)
    assert projected.rows("SELECT status, created_us, meetings_held FROM deals") == [
        ("open", us(2), 1)
    ]


def test_an_unknown_event_type_is_parked_and_the_other_deals_go_on(
    projected: Projected, caplog: pytest.LogCaptureFixture
) -> None:
    log = Log()
    log.create("d1", 0)
    strange = log.add("d1", "deal.teleported", 1)
    log.meeting("d1", 2)
    log.create("d2", 2)
    log.meeting("d2", 3)
    with caplog.at_level(logging.ERROR):
        result = projected.apply(log.events)

    # d1's meeting comes after its parked event: it is held (parked) behind
    # it, not applied (it used to be). d2 goes on.
    assert (result.applied, result.parked) == (5, 2)
    assert projected.rows(
        "SELECT deal_id, meetings_held, stream_version, parked FROM deals "
        "ORDER BY deal_id"
    ) == [("d1", 0, 4, 2), ("d2", 1, 3, 0)]
    parked = projected.rows(
        "SELECT event_id, position, error, raw FROM parked_events ORDER BY id"
    )
    assert parked[0][:2] == (strange["event_id"], strange["position"])
    assert "deal.teleported" in parked[0][2]
    assert json.loads(parked[0][3])["type"] == "deal.teleported"
    assert any(
        f"position={strange['position']}" in r.getMessage() and r.levelname == "ERROR"
        for r in caplog.records
    )


def test_data_that_breaks_its_schema_is_parked_with_the_field_named(
    projected: Projected,
) -> None:
    log = Log()
    log.create("d1", 0)
    broken = log.change("d1", "connecting", 1)
    del broken["data"]["to"]
    log.meeting("d1", 2)
    result = projected.apply(log.events)

    # The meeting after the broken stage change is held behind it (parked,
    # not applied, as it used to be).
    assert (result.applied, result.parked) == (2, 2)
    error = projected.rows("SELECT error FROM parked_events ORDER BY id")[0][0]
    assert "/data/to" in error
    assert projected.rows("SELECT stage, meetings_held FROM deals") == [
        ("prospecting", 0)
    ]


def test_a_parked_event_delivered_again_is_not_parked_twice(
    projected: Projected,
) -> None:
    log = Log()
    log.create("d1", 0)
    log.add("d1", "deal.teleported", 1)
    projected.apply(log.events)
    again = projected.apply(log.events)

    assert again.skipped == 3 and again.parked == 0
    assert projected.rows("SELECT count(*) FROM parked_events") == [(1,)]


def test_a_value_that_is_not_an_envelope_is_parked_raw(projected: Projected) -> None:
    log = Log()
    log.create("d1", 0)
    values = [b"{not json", b'{"event_id": "x"}', *log.events]
    result = projected.projection.apply(
        [
            Incoming(v, source="kafka", topic="t", partition=0, offset=i)
            for i, v in enumerate(values)
        ],
        lambda _connection, _result: None,
    )

    assert (result.applied, result.parked) == (2, 2)
    assert projected.rows(
        'SELECT raw, partition, "offset" FROM parked_events ORDER BY id'
    ) == [
        ("{not json", 0, 0),
        ('{"event_id": "x"}', 0, 1),
    ]


def test_an_event_the_database_refuses_is_parked_and_the_rest_applies(
    projected: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Log()
    log.create("good", 0)
    log.create("boom", 0)
    log.meeting("good", 1)
    original = Projection._write

    def write(self: Projection, connection: sa.Connection, changes: object) -> None:
        if any(
            d == "boom" and s.changed and s.visit_count
            for d, s in changes.deals.items()
        ):  # type: ignore[attr-defined]
            raise sa.exc.IntegrityError("INSERT", {}, Exception("refused"))
        original(self, connection, changes)  # type: ignore[arg-type]

    monkeypatch.setattr(Projection, "_write", write)
    result = projected.apply(log.events)

    assert (result.applied, result.parked) == (4, 1)  # boom's stage.changed
    assert projected.rows(
        "SELECT deal_id, status, stream_version, meetings_held FROM deals "
        "ORDER BY deal_id"
    ) == [("boom", "pending", 2, 0), ("good", "open", 3, 1)]
    assert projected.rows("SELECT deal_id, event_type FROM parked_events") == [
        ("boom", "stage.changed")
    ]


def test_a_stale_offset_rolls_the_whole_batch_back(projected: Projected) -> None:
    log = Log()
    log.create("d1", 0)
    offsets = KafkaOffsets(projected.engine, "deal-events")
    batch = [
        Incoming(e, source="kafka", topic="deal-events", partition=0, offset=i)
        for i, e in enumerate(log.events)
    ]
    projected.projection.apply(batch, offsets.writer({}))
    assert offsets.stored([0]) == {0: 2}

    log.meeting("d1", 1)
    late = [
        Incoming(
            log.events[-1], source="kafka", topic="deal-events", partition=0, offset=2
        )
    ]
    with pytest.raises(OffsetConflict):
        projected.projection.apply(late, offsets.writer({0: 1}))
    assert projected.rows("SELECT meetings_held FROM deals") == [(0,)]
    assert offsets.stored([0]) == {0: 2}


def test_a_deals_events_after_its_parked_one_are_held_behind_it_in_order(
    projected: Projected,
) -> None:
    log = Log()
    log.create("d1", 0)
    broken = log.change("d1", "connecting", 1)
    del broken["data"]["to"]
    log.change("d1", "researching", 2)
    log.meeting("d1", 3)
    log.create("d2", 0)
    log.change("d2", "connecting", 1)
    # Batches of 2: the second and third are held behind an event parked by
    # an earlier batch, found in the parking table.
    result = projected.apply(log.events, batch=2)

    assert (result.applied, result.parked) == (5, 3)
    held = (
        "held behind the earlier parked event of deal d1 "
        f"(position=3 event_id={broken['event_id']})"
    )
    parked = projected.rows(
        "SELECT position, stream_version, error FROM parked_events ORDER BY id"
    )
    assert [row[:2] for row in parked] == [(3, 3), (4, 4), (5, 5)]
    assert "/data/to" in parked[0][2]
    assert parked[1][2].startswith(held) and parked[2][2].startswith(held)
    # Applied on top, the researching change would have closed a prospecting
    # visit the deal never left (as far as the read models know).
    assert visits(projected, "d1") == [("prospecting", us(0), None, None, None, None)]
    assert projected.rows(
        "SELECT deal_id, stream_version, parked, stage, meetings_held FROM deals "
        "ORDER BY deal_id"
    ) == [("d1", 5, 3, "prospecting", 0), ("d2", 3, 0, "connecting", 0)]

    # Delivered again, nothing is parked twice.
    again = projected.apply(log.events)
    assert (again.skipped, again.parked) == (len(log.events), 0)
    assert projected.rows("SELECT count(*) FROM parked_events") == [(3,)]


def test_an_event_without_a_readable_envelope_holds_nothing_back(
    projected: Projected,
) -> None:
    log = Log()
    log.create("d1", 0)
    unreadable = log.add("d1", "meeting.held", 1)
    del unreadable["occurred_at"]
    log.meeting("d1", 2)
    result = projected.apply(log.events)

    # No envelope, no stream version: the deal cannot be moved past it, and
    # its later events are applied.
    assert (result.applied, result.parked) == (3, 1)
    assert projected.rows("SELECT deal_id, stream_version FROM parked_events") == [
        ("d1", None)
    ]
    assert projected.rows(
        "SELECT stream_version, parked, meetings_held FROM deals"
    ) == [(4, 0, 1)]


def test_an_event_the_database_refuses_holds_its_deal_back_too(
    projected: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Log()
    log.create("boom", 0)
    log.meeting("boom", 1)
    original = Projection._write

    def write(self: Projection, connection: sa.Connection, changes: object) -> None:
        if any(
            d == "boom" and s.changed and s.visit_count
            for d, s in changes.deals.items()
        ):  # type: ignore[attr-defined]
            raise sa.exc.IntegrityError("INSERT", {}, Exception("refused"))
        original(self, connection, changes)  # type: ignore[arg-type]

    monkeypatch.setattr(Projection, "_write", write)
    result = projected.apply(log.events)

    assert (result.applied, result.parked) == (1, 2)
    parked = projected.rows(
        "SELECT event_type, stream_version, error FROM parked_events ORDER BY id"
    )
    assert [row[:2] for row in parked] == [("stage.changed", 2), ("meeting.held", 3)]
    assert parked[0][2].startswith("cannot be written")
    assert parked[1][2].startswith("held behind the earlier parked event of deal boom")
    assert projected.rows(
        "SELECT stream_version, parked, meetings_held FROM deals"
    ) == [(3, 2, 0)]
