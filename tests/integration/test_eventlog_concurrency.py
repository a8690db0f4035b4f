"""The event log under concurrent writers, on SQLite and on PostgreSQL.

What a feed reader (the relay, a projector) relies on: an acknowledged event
is in the log exactly once, every stream is numbered 1..n without gaps, and
no event ever appears below a position the feed has already handed out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from progression.db import create_engine, migrate
from progression.errors import DuplicateEventId, StreamConflict
from progression.eventlog import (
    COMMIT_ORDER_LOCK,
    EventLog,
    NewEvent,
    RecordedEvent,
    StreamWrite,
)
from progression.tables import events
from tests.eventlog_support import pending_summary

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
JOIN_TIMEOUT_S = 60
WRITERS = 8
EVENTS_PER_WRITER = 50


def new_event(event_id: str, deal_id: str) -> NewEvent:
    return NewEvent(
        event_id=event_id,
        type="email.opened",
        deal_id=deal_id,
        occurred_at=T0,
        data={"event": event_id},
        digest="ab" * 32,
    )


class Worker(threading.Thread):
    """A thread that records what it was told and what went wrong."""

    def __init__(self, name: str, work: Callable[[Worker], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.work = work
        self.acknowledged: list[RecordedEvent] = []
        self.conflicts = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.work(self)
        except BaseException as error:
            self.error = error


def join_all(threads: list[Worker]) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert [t.name for t in threads if t.is_alive()] == [], "threads did not finish"
    errors = {t.name: t.error for t in threads if t.error is not None}
    assert errors == {}


def test_concurrent_writers_never_lose_reorder_or_duplicate_an_event(
    engine: sa.Engine,
) -> None:
    log = EventLog(engine)
    shared_deal = "d-shared"

    def contend(worker: Worker) -> None:
        # Read the stream's head, decide, append; on a conflict, read again.
        for n in range(EVENTS_PER_WRITER):
            event = new_event(f"{worker.name}-{n}", shared_deal)
            while True:
                head = log.deal(shared_deal)
                expected = 0 if head is None else head.version
                write = StreamWrite(
                    shared_deal, expected, [event], pending_summary(shared_deal)
                )
                try:
                    worker.acknowledged += log.append([write])
                    break
                except StreamConflict:
                    worker.conflicts += 1

    def own_deal(worker: Worker) -> None:
        deal_id = f"d-{worker.name}"
        for n in range(EVENTS_PER_WRITER):
            event = new_event(f"{worker.name}-{n}", deal_id)
            write = StreamWrite(deal_id, n, [event], pending_summary(deal_id))
            worker.acknowledged += log.append([write])

    writing = threading.Event()
    writing.set()
    seen: list[int] = []

    def follow(worker: Worker) -> None:
        # Follow the feed the way the relay does: only the last position.
        after = 0
        while True:
            still_writing = writing.is_set()
            page = log.feed(after=after, limit=50)
            for event in page:
                assert event.position > after, (event.position, after)
                after = event.position
                seen.append(event.position)
            if not page:
                if not still_writing:
                    return
                time.sleep(0.001)

    writers = [Worker(f"contender-{i}", contend) for i in range(WRITERS)]
    writers += [Worker(f"owner-{i}", own_deal) for i in range(WRITERS)]
    reader = Worker("reader", follow)
    reader.start()
    for writer in writers:
        writer.start()
    join_all(writers)
    writing.clear()
    join_all([reader])

    everything = log.feed(0, 100_000)
    acknowledged = [e for writer in writers for e in writer.acknowledged]
    assert len(acknowledged) == 2 * WRITERS * EVENTS_PER_WRITER
    assert sorted(e.event_id for e in everything) == sorted(
        e.event_id for e in acknowledged
    )
    assert {e.event_id: e for e in everything} == {e.event_id: e for e in acknowledged}

    streams = log.read_streams({e.deal_id for e in everything})
    for deal_id, stream in streams.items():
        versions = [e.stream_version for e in stream]
        assert versions == list(range(1, len(stream) + 1)), deal_id
        head = log.deal(deal_id)
        assert head is not None and head.version == len(stream)
    assert len(streams[shared_deal]) == WRITERS * EVENTS_PER_WRITER

    assert seen == [e.position for e in everything]
    assert seen == sorted(set(seen))
    assert log.head_position() == seen[-1]


def test_the_same_event_id_appended_concurrently_is_accepted_once(
    engine: sa.Engine,
) -> None:
    log = EventLog(engine)
    start = threading.Barrier(WRITERS, timeout=JOIN_TIMEOUT_S)
    outcomes: list[str] = []

    def race(worker: Worker) -> None:
        deal_id = f"d-{worker.name}"
        write = StreamWrite(
            deal_id, 0, [new_event("e-once", deal_id)], pending_summary(deal_id)
        )
        start.wait()
        try:
            worker.acknowledged += log.append([write])
            outcomes.append("accepted")
        except DuplicateEventId as refused:
            assert refused.event_id == "e-once"
            outcomes.append("refused")

    workers = [Worker(f"w{i}", race) for i in range(WRITERS)]
    for worker in workers:
        worker.start()
    join_all(workers)

    assert sorted(outcomes) == ["accepted"] + ["refused"] * (WRITERS - 1)
    (winner,) = [e for worker in workers for e in worker.acknowledged]
    assert log.feed() == [winner]
    assert [deal.deal_id for deal in log.deals()] == [winner.deal_id]


# -- PostgreSQL: why appends are serialised --------------------------------------


@pytest.fixture
def postgres_engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(postgres_url)
    migrate(engine)
    yield engine
    engine.dispose()


def raw_event(event_id: str, deal_id: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "deal_id": deal_id,
        "stream_version": 1,
        "type": "email.opened",
        "occurred_at": T0,
        "recorded_at": T0,
        "schema_version": 1,
        "data": {},
        "digest": "",
    }


def insert_position(connection: sa.Connection, event_id: str, deal_id: str) -> int:
    statement = sa.insert(events).returning(events.c.position)
    return int(connection.execute(statement, raw_event(event_id, deal_id)).scalar_one())


def wait_for_lock_waiter(engine: sa.Engine) -> None:
    """Until some connection waits for the commit-order advisory lock."""
    query = sa.text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    )
    deadline = time.monotonic() + 10
    with engine.connect() as connection:
        while time.monotonic() < deadline:
            if connection.execute(query).scalar_one():
                return
            connection.rollback()
            time.sleep(0.01)
    raise AssertionError("no append waited for the commit-order lock")


@pytest.mark.postgres
def test_without_serialised_commits_a_higher_position_commits_first(
    postgres_engine: sa.Engine,
) -> None:
    # The hazard itself, with plain inserts that skip the log's lock: the
    # sequence hands out 1 then 2, and 2 commits while 1 is still open.
    log = EventLog(postgres_engine)
    with postgres_engine.connect() as first, postgres_engine.connect() as second:
        lower = insert_position(first, "e-lower", "d-1")
        higher = insert_position(second, "e-higher", "d-2")
        second.commit()

        assert lower < higher
        assert [e.position for e in log.feed()] == [higher]
        # A reader that moved its cursor to `higher` now would skip `lower`.
        first.commit()

    assert [e.position for e in log.feed()] == [lower, higher]
    assert log.feed(after=higher) == []


@pytest.mark.postgres
def test_an_append_commits_only_after_an_earlier_open_append(
    postgres_engine: sa.Engine,
) -> None:
    # The first transaction does what an append does (take the commit-order
    # lock, insert, draw the lower position) and stays open; the second is a
    # real append. It must wait, so the feed can never show its higher
    # position before the lower one.
    log = EventLog(postgres_engine)
    with postgres_engine.connect() as first:
        first.execute(sa.select(sa.func.pg_advisory_xact_lock(COMMIT_ORDER_LOCK)))
        lower = insert_position(first, "e-lower", "d-1")

        write = StreamWrite(
            "d-2", 0, [new_event("e-higher", "d-2")], pending_summary("d-2")
        )

        def second_append(worker: Worker) -> None:
            worker.acknowledged += log.append([write])

        second = Worker("second", second_append)
        second.start()
        wait_for_lock_waiter(postgres_engine)

        assert second.is_alive()
        assert second.acknowledged == []
        assert log.feed() == []
        first.commit()

    join_all([second])
    (higher,) = second.acknowledged
    assert lower < higher.position
    assert [e.position for e in log.feed()] == [lower, higher.position]


@pytest.mark.postgres
def test_an_append_waits_for_the_insert_of_another_append_to_commit(
    postgres_engine: sa.Engine,
) -> None:
    # Both through EventLog.append: the first is held just after inserting
    # its events, before its commit.
    log = EventLog(postgres_engine)
    inserted = threading.Event()
    release = threading.Event()

    def hold_after_insert(
        connection: sa.Connection, cursor: Any, statement: str, *args: Any
    ) -> None:
        if threading.current_thread().name == "first" and "INSERT INTO events" in (
            statement
        ):
            inserted.set()
            assert release.wait(JOIN_TIMEOUT_S)

    sa.event.listen(postgres_engine, "after_cursor_execute", hold_after_insert)
    try:

        def append_one(deal_id: str) -> Callable[[Worker], None]:
            def append(worker: Worker) -> None:
                event = new_event(f"e-{deal_id}", deal_id)
                write = StreamWrite(deal_id, 0, [event], pending_summary(deal_id))
                worker.acknowledged += log.append([write])

            return append

        first = Worker("first", append_one("d-1"))
        first.start()
        assert inserted.wait(JOIN_TIMEOUT_S)
        second = Worker("second", append_one("d-2"))
        second.start()
        wait_for_lock_waiter(postgres_engine)

        assert log.feed() == []
        assert second.acknowledged == []
        release.set()
        join_all([first, second])
    finally:
        release.set()
        sa.event.remove(postgres_engine, "after_cursor_execute", hold_after_insert)

    (lower,) = first.acknowledged
    (higher,) = second.acknowledged
    assert lower.position < higher.position
    assert log.feed() == [lower, higher]
