"""The event log's contract, run once on SQLite and once on PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from progression.db import create_engine, current_revision, migrate, schema_differences
from progression.errors import (
    DuplicateEventId,
    InvalidEvent,
    ProcessVersionChanged,
    StorageUnavailable,
    StreamConflict,
)
from progression.eventlog import (
    DealSummary,
    EventLog,
    NewEvent,
    RecordedEvent,
    StreamWrite,
)
from progression.tables import events

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))


@pytest.fixture
def log(engine: sa.Engine) -> EventLog:
    return EventLog(engine)


def event(
    event_id: str,
    deal_id: str,
    *,
    type: str = "email.opened",
    at: datetime = T0,
    data: dict[str, Any] | None = None,
    causation_id: str | None = None,
) -> NewEvent:
    return NewEvent(
        event_id=event_id,
        type=type,
        deal_id=deal_id,
        occurred_at=at,
        data={"n": event_id} if data is None else data,
        source="hubspot",
        actor="rep-7",
        causation_id=causation_id,
        digest="ab" * 32,
    )


def summary(deal_id: str, **fields: Any) -> DealSummary:
    values: dict[str, Any] = {
        "deal_id": deal_id,
        "version": 0,
        "status": "open",
        "stage": "prospecting",
        "stage_entered_at": T0,
        "process": "b2b-default",
        "process_version": 1,
        "owner": "rep-7",
        "amount": 12_500.0,
        "currency": "EUR",
        "lead_score": 15,
        "created_at": T0,
        "updated_at": None,
    }
    values.update(fields)
    return DealSummary(**values)


def write(
    deal_id: str, expected: int, *event_ids: str, **summary_fields: Any
) -> StreamWrite:
    return StreamWrite(
        deal_id=deal_id,
        expected_version=expected,
        events=[event(e, deal_id) for e in event_ids],
        summary=summary(deal_id, **summary_fields),
    )


def whole_log(log: EventLog) -> list[RecordedEvent]:
    return log.feed(0, 100_000)


# -- appending -----------------------------------------------------------------


def test_an_append_assigns_stream_versions_one_to_n_and_increasing_positions(
    log: EventLog,
) -> None:
    recorded = log.append(
        [write("d-1", 0, "e-1", "e-2", "e-3"), write("d-2", 0, "e-4")]
    )

    assert [e.event_id for e in recorded] == ["e-1", "e-2", "e-3", "e-4"]
    assert [(e.deal_id, e.stream_version) for e in recorded] == [
        ("d-1", 1),
        ("d-1", 2),
        ("d-1", 3),
        ("d-2", 1),
    ]
    positions = [e.position for e in recorded]
    assert positions == sorted(positions)
    assert len(set(positions)) == 4
    assert positions[0] >= 1
    assert len({e.recorded_at for e in recorded}) == 1


def test_a_later_append_continues_the_stream_and_the_positions(log: EventLog) -> None:
    first = log.append([write("d-1", 0, "e-1", "e-2")])
    second = log.append([write("d-1", 2, "e-3")])

    assert second[0].stream_version == 3
    assert second[0].position > first[-1].position
    assert [e.stream_version for e in log.read_stream("d-1")] == [1, 2, 3]


def test_an_empty_append_writes_nothing(log: EventLog) -> None:
    assert log.append([]) == []
    assert log.head_position() == 0


def test_a_stale_expected_version_is_refused_and_nothing_is_written(
    log: EventLog,
) -> None:
    log.append([write("d-1", 0, "e-1", "e-2")])
    before = whole_log(log)

    with pytest.raises(StreamConflict) as refused:
        log.append([write("d-2", 0, "e-3"), write("d-1", 1, "e-4")])

    assert (refused.value.deal_id, refused.value.expected) == ("d-1", 1)
    assert refused.value.actual == 2
    assert refused.value.retriable
    assert whole_log(log) == before
    assert log.deal("d-2") is None
    head = log.deal("d-1")
    assert head is not None and head.version == 2


def test_creating_a_deal_that_is_already_in_the_log_is_a_conflict(
    log: EventLog,
) -> None:
    log.append([write("d-1", 0, "e-1")])

    with pytest.raises(StreamConflict) as refused:
        log.append([write("d-1", 0, "e-2")])

    assert (refused.value.expected, refused.value.actual) == (0, 1)
    assert [e.event_id for e in log.read_stream("d-1")] == ["e-1"]


def test_an_expected_version_ahead_of_the_stream_is_a_conflict(log: EventLog) -> None:
    with pytest.raises(StreamConflict) as refused:
        log.append([write("d-1", 3, "e-1")])

    assert (refused.value.expected, refused.value.actual) == (3, 0)
    assert log.head_position() == 0


def test_a_duplicate_event_id_within_one_append_is_refused(log: EventLog) -> None:
    with pytest.raises(DuplicateEventId) as refused:
        log.append([write("d-1", 0, "e-1"), write("d-2", 0, "e-2", "e-1")])

    assert refused.value.event_id == "e-1"
    assert whole_log(log) == []
    assert log.deals() == []


def test_an_event_id_already_in_the_log_is_refused_and_nothing_is_written(
    log: EventLog,
) -> None:
    log.append([write("d-1", 0, "e-1", "e-2")])
    before = whole_log(log)
    head_before = log.deal("d-1")

    with pytest.raises(DuplicateEventId) as refused:
        log.append([write("d-1", 2, "e-3"), write("d-2", 0, "e-4", "e-2")])

    assert refused.value.event_id == "e-2"
    assert refused.value.retriable
    assert whole_log(log) == before
    assert log.deal("d-1") == head_before
    assert log.deal("d-2") is None


def test_the_database_itself_refuses_a_second_event_id_or_stream_version(
    log: EventLog, engine: sa.Engine
) -> None:
    (recorded,) = log.append([write("d-1", 0, "e-1")])
    row = {
        "event_id": "e-1",
        "deal_id": "d-9",
        "stream_version": 1,
        "type": "email.sent",
        "occurred_at": T0,
        "recorded_at": T0,
        "schema_version": 1,
        "data": {},
        "digest": "",
    }

    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        connection.execute(sa.insert(events), row)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        connection.execute(
            sa.insert(events), {**row, "event_id": "e-2", "deal_id": "d-1"}
        )
    assert whole_log(log) == [recorded]


def test_an_append_that_breaks_its_own_shape_is_refused(log: EventLog) -> None:
    stray = StreamWrite("d-1", 0, [event("e-1", "d-2")], summary("d-1"))
    naive = StreamWrite(
        "d-1",
        0,
        [replace(event("e-1", "d-1"), occurred_at=datetime(2026, 1, 1))],
        summary("d-1"),
    )
    cases = [
        [write("d-1", 0, "e-1"), write("d-1", 1, "e-2")],
        [stray],
        [naive],
        [write("d-1", 0)],
        [write("d-1", 0, "e-1", status="maybe")],
        [write("d-1", -1, "e-1")],
        [write("d-1", 0, "e-1", created_at=datetime(2026, 1, 1))],
    ]
    for writes in cases:
        with pytest.raises(ValueError):
            log.append(writes)
    assert log.head_position() == 0


# -- reading events ------------------------------------------------------------


def test_read_stream_returns_exactly_what_was_appended(log: EventLog) -> None:
    data = {"nested": {"list": [1, 2.5, "three", None, True]}, "text": "é ✓"}
    first = log.append([write("d-1", 0, "e-1")])
    decision = replace(
        event("e-2", "d-1", type="stage.changed", data=data, causation_id="e-1"),
        schema_version=2,
        source=None,
        actor=None,
        digest="",
    )
    second = log.append([StreamWrite("d-1", 1, [decision], summary("d-1"))])

    stream = log.read_stream("d-1")

    assert stream == first + second
    assert stream[1].data == data
    assert stream[1].schema_version == 2
    assert (stream[1].source, stream[1].actor, stream[1].causation_id) == (
        None,
        None,
        "e-1",
    )
    assert log.read_stream("nobody") == []


def test_read_streams_returns_each_stream_in_order_and_omits_absent_deals(
    log: EventLog,
) -> None:
    a = log.append([write("d-1", 0, "e-1", "e-2"), write("d-2", 0, "e-3")])
    b = log.append([write("d-1", 2, "e-4")])

    streams = log.read_streams(["d-1", "d-2", "d-3"])

    assert streams == {"d-1": [a[0], a[1], b[0]], "d-2": [a[2]]}
    assert log.read_streams([]) == {}


def test_reads_by_many_ids_are_batched_and_complete(log: EventLog) -> None:
    deal_ids = [f"d-{n:04d}" for n in range(1_200)]
    log.append([write(d, 0, f"e-{d}") for d in deal_ids])

    streams = log.read_streams(deal_ids)
    found = log.events_by_id([f"e-{d}" for d in deal_ids])

    assert sorted(streams) == deal_ids
    assert all(len(stream) == 1 for stream in streams.values())
    assert len(found) == 1_200


def test_events_by_id_returns_the_events_in_the_log(log: EventLog) -> None:
    recorded = log.append([write("d-1", 0, "e-1", "e-2"), write("d-2", 0, "e-3")])

    found = log.events_by_id({"e-1", "e-3", "e-404"})

    assert found == {"e-1": recorded[0], "e-3": recorded[2]}
    assert log.events_by_id([]) == {}


def test_caused_by_returns_the_decisions_of_each_input_in_stream_order(
    log: EventLog,
) -> None:
    def decision(event_id: str, cause: str) -> NewEvent:
        return event(event_id, "d-1", type="stage.changed", causation_id=cause)

    inputs = [event("in-1", "d-1"), decision("c-1", "in-1"), decision("c-2", "in-1")]
    first = log.append([StreamWrite("d-1", 0, inputs, summary("d-1"))])
    later = [event("in-2", "d-1"), decision("c-3", "in-2")]
    second = log.append([StreamWrite("d-1", 3, later, summary("d-1"))])

    caused = log.caused_by(["in-1", "in-2", "in-3", "c-1"])

    assert caused == {"in-1": [first[1], first[2]], "in-2": [second[1]]}


def test_feed_pages_through_the_whole_log_in_position_order(log: EventLog) -> None:
    appended: list[RecordedEvent] = []
    for n in range(7):
        deal = f"d-{n % 3}"
        version = len(log.read_stream(deal))
        appended += log.append([write(deal, version, f"e-{n}-a", f"e-{n}-b")])

    pages: list[list[RecordedEvent]] = []
    after = 0
    while page := log.feed(after=after, limit=3):
        pages.append(page)
        after = page[-1].position

    assert [len(page) for page in pages] == [3, 3, 3, 3, 2]
    assert [e for page in pages for e in page] == appended
    assert log.feed(after=appended[-1].position) == []
    assert log.feed(after=appended[3].position, limit=2) == appended[4:6]


def test_head_position_is_the_highest_committed_position(log: EventLog) -> None:
    assert log.head_position() == 0
    recorded = log.append([write("d-1", 0, "e-1", "e-2")])
    assert log.head_position() == recorded[-1].position


def test_a_limit_below_one_is_refused(log: EventLog) -> None:
    with pytest.raises(ValueError):
        log.feed(limit=0)
    with pytest.raises(ValueError):
        log.deals(limit=0)


# -- times ---------------------------------------------------------------------


def test_times_round_trip_as_the_same_instant_in_utc(log: EventLog) -> None:
    local = datetime(2026, 3, 2, 11, 30, 15, 250_000, tzinfo=PLUS_TWO)
    new = replace(event("e-1", "d-1"), occurred_at=local)
    deal = summary("d-1", stage_entered_at=local, created_at=local)
    (recorded,) = log.append([StreamWrite("d-1", 0, [new], deal)])

    (read,) = log.read_stream("d-1")
    head = log.deal("d-1")

    expected = datetime(2026, 3, 2, 9, 30, 15, 250_000, tzinfo=UTC)
    for moment in (recorded.occurred_at, read.occurred_at):
        assert moment == expected and moment.utcoffset() == timedelta(0)
    assert read.recorded_at.tzinfo is not None
    assert read.recorded_at.utcoffset() == timedelta(0)
    assert read.recorded_at == recorded.recorded_at
    assert head is not None
    assert head.stage_entered_at == expected == head.created_at
    assert head.stage_entered_at is not None
    assert head.stage_entered_at.utcoffset() == timedelta(0)
    assert head.updated_at == recorded.recorded_at


def test_the_envelope_is_json_ready_with_utc_times(log: EventLog) -> None:
    exact = datetime(2026, 3, 2, 11, 30, tzinfo=PLUS_TWO)
    new = replace(event("e-1", "d-1"), occurred_at=exact)
    (recorded,) = log.append([StreamWrite("d-1", 0, [new], summary("d-1"))])
    fraction = replace(recorded, recorded_at=datetime(2026, 3, 2, 9, 0, 0, 5, UTC))

    envelope = recorded.envelope()

    assert envelope == {
        "event_id": "e-1",
        "type": "email.opened",
        "deal_id": "d-1",
        "occurred_at": "2026-03-02T09:30:00Z",
        "recorded_at": envelope["recorded_at"],
        "source": "hubspot",
        "actor": "rep-7",
        "data": {"n": "e-1"},
        "schema_version": 1,
        "position": recorded.position,
        "stream_version": 1,
    }
    assert envelope["recorded_at"].endswith("Z")
    assert fraction.envelope()["recorded_at"] == "2026-03-02T09:00:00.000005Z"


# -- deals ---------------------------------------------------------------------


def test_deal_returns_the_summary_with_the_version_set_by_the_log(
    log: EventLog,
) -> None:
    log.append([write("d-1", 0, "e-1", "e-2", version=99)])
    (last,) = log.append(
        [write("d-1", 2, "e-3", status="won", stage=None, lead_score=None)]
    )

    head = log.deal("d-1")

    assert head == summary(
        "d-1",
        version=3,
        status="won",
        stage=None,
        lead_score=None,
        updated_at=last.recorded_at,
    )
    assert log.deal("nobody") is None


def test_deals_filters_by_status_stage_owner_and_process(log: EventLog) -> None:
    log.append(
        [
            write("d-1", 0, "e-1", status="pending", stage=None, owner=None),
            write("d-2", 0, "e-2", stage="connecting", owner="rep-1"),
            write("d-3", 0, "e-3", stage="connecting", owner="rep-2"),
            write("d-4", 0, "e-4", status="lost", stage=None, process="fast-track"),
            write("d-5", 0, "e-5", owner="rep-1", process="fast-track"),
        ]
    )

    def ids(deals: list[DealSummary]) -> list[str]:
        return [deal.deal_id for deal in deals]

    assert ids(log.deals()) == ["d-1", "d-2", "d-3", "d-4", "d-5"]
    assert ids(log.deals(status="open")) == ["d-2", "d-3", "d-5"]
    assert ids(log.deals(status="pending")) == ["d-1"]
    assert ids(log.deals(stage="connecting")) == ["d-2", "d-3"]
    assert ids(log.deals(owner="rep-1")) == ["d-2", "d-5"]
    assert ids(log.deals(process="fast-track")) == ["d-4", "d-5"]
    assert ids(log.deals(status="open", owner="rep-1", process="b2b-default")) == [
        "d-2"
    ]
    assert log.deals(status="won") == []


def test_deals_pages_by_deal_id_without_gaps_or_repeats(log: EventLog) -> None:
    deal_ids = [f"d-{n:03d}" for n in range(47)]
    log.append(
        [
            write(d, 0, f"e-{d}", owner="rep-1" if n % 3 else "rep-2")
            for n, d in enumerate(reversed(deal_ids))
        ]
    )

    def pages(**filters: Any) -> list[list[str]]:
        seen: list[list[str]] = []
        after: str | None = None
        while page := log.deals(after=after, limit=10, **filters):
            seen.append([deal.deal_id for deal in page])
            after = page[-1].deal_id
        return seen

    everything = pages()
    assert [len(page) for page in everything] == [10, 10, 10, 10, 7]
    assert [d for page in everything for d in page] == deal_ids
    rep_1 = [d for page in pages(owner="rep-1") for d in page]
    assert rep_1 == [deal.deal_id for deal in log.deals(owner="rep-1", limit=100)]
    assert len(rep_1) == len(set(rep_1)) == 31


# -- processes -----------------------------------------------------------------


def test_a_process_version_is_registered_once_and_never_changes(
    log: EventLog,
) -> None:
    definition = {"key": "b2b-default", "stages": [{"key": "prospecting"}]}

    assert log.register_process("b2b-default", 1, definition, "aa" * 32) is True
    assert log.register_process("b2b-default", 1, definition, "aa" * 32) is False
    with pytest.raises(ProcessVersionChanged) as changed:
        log.register_process("b2b-default", 1, {"key": "other"}, "bb" * 32)
    assert (changed.value.key, changed.value.version) == ("b2b-default", 1)
    assert log.register_process("b2b-default", 2, {"v": 2}, "bb" * 32) is True
    assert log.register_process("fast-track", 1, {"v": 1}, "cc" * 32) is True

    stored = log.processes()
    assert [(p.key, p.version) for p in stored] == [
        ("b2b-default", 1),
        ("b2b-default", 2),
        ("fast-track", 1),
    ]
    assert stored[0].definition == definition
    assert stored[0].digest == "aa" * 32
    assert stored[0].recorded_at.utcoffset() == timedelta(0)
    assert [p.version for p in log.processes("b2b-default")] == [1, 2]
    assert log.processes("unknown") == []


# -- schema and storage --------------------------------------------------------


def test_the_migrated_schema_matches_the_tables(engine: sa.Engine) -> None:
    assert schema_differences(engine) == []


def test_migrating_again_is_a_no_op(
    log: EventLog, engine: sa.Engine, database_url: str
) -> None:
    recorded = log.append([write("d-1", 0, "e-1")])
    revision = current_revision(engine)

    migrate(engine)
    migrate(database_url)

    assert revision is not None
    assert current_revision(engine) == revision
    assert whole_log(log) == recorded
    assert schema_differences(engine) == []


def test_an_unmigrated_database_has_no_revision(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        assert current_revision(engine) is None
    finally:
        engine.dispose()


def test_an_unreachable_database_is_storage_unavailable(
    database_url: str, tmp_path: Any
) -> None:
    url = sa.make_url(database_url)
    if url.get_backend_name() == "sqlite":
        url = url.set(database=str(tmp_path / "missing" / "folder" / "log.db"))
    else:
        url = url.set(port=1, host="127.0.0.1")
    engine = create_engine(url.render_as_string(hide_password=False))
    log = EventLog(engine)
    try:
        with pytest.raises(StorageUnavailable) as failed:
            log.append([write("d-1", 0, "e-1")])
        assert failed.value.retriable
        with pytest.raises(StorageUnavailable):
            log.feed()
        with pytest.raises(StorageUnavailable):
            log.deal("d-1")
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_value_postgresql_cannot_hold_is_an_invalid_event(
    postgres_url: str,
) -> None:
    engine = create_engine(postgres_url)
    try:
        migrate(engine)
        log = EventLog(engine)
        nul = replace(event("e-1", "d-1"), data={"note": "a\u0000b"})

        with pytest.raises(InvalidEvent):
            log.append([StreamWrite("d-1", 0, [nul], summary("d-1"))])

        assert log.head_position() == 0
        assert log.deal("d-1") is None
    finally:
        engine.dispose()
