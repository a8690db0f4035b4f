"""Ingestion over a real database: concurrency and re-posting."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from progression.service import Service
from progression.settings import load_settings

from .progression_support import event, happy_path


@pytest.fixture
def service(database_url: str) -> Iterator[Service]:
    service = Service.start(load_settings(database_url=database_url))
    yield service
    service.engine.dispose()


def test_concurrent_writers_lose_nothing_and_the_feed_only_moves_forward(
    service: Service,
) -> None:
    # One hot deal shared by every writer, and one deal per writer. Sixteen
    # writers lose more races on the hot deal than the retries allow unless
    # the writers that lost a few queue for it (`EventLog.writers_of`).
    writers = 16
    per_writer = 25
    acknowledged: list[str] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    done = threading.Event()
    seen_positions: list[int] = []

    def write(n: int) -> None:
        rng = random.Random(n)
        own = happy_path(f"own-{n}")
        try:
            for i in range(per_writer):
                if i < len(own) and rng.random() < 0.5:
                    item = own[i]
                else:
                    item = event(f"hot-{n}-{i}", "email.opened", "hot", 1 + i)
                [result] = service.ingestion.submit([item])
                assert result.status == "created", result
                with lock:
                    acknowledged.append(item["event_id"])
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    def follow() -> None:
        after = 0
        while True:
            finished = done.is_set()
            for recorded in service.log.feed(after, 500):
                assert recorded.position > after, "the feed went backwards"
                seen_positions.append(recorded.position)
                after = recorded.position
            if finished:
                return

    service.ingestion.submit(
        [event("hot-created", "deal.created", "hot", 0, owner="r")]
    )
    reader = threading.Thread(target=follow)
    reader.start()
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    done.set()
    reader.join(timeout=60)

    assert not failures, failures
    log = service.log.feed(0, 100_000)
    ids = [e.event_id for e in log]
    assert len(ids) == len(set(ids))
    assert set(acknowledged) <= set(ids)
    assert len(acknowledged) == writers * per_writer
    streams: dict[str, list[int]] = {}
    for recorded in log:
        streams.setdefault(recorded.deal_id, []).append(recorded.stream_version)
    for deal_id, versions in streams.items():
        assert versions == list(range(1, len(versions) + 1)), deal_id
    assert seen_positions == [e.position for e in log]


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_reposting_any_events_changes_nothing(
    tmp_path: Path, data: st.DataObject
) -> None:
    database = tmp_path / f"repost-{data.draw(st.integers(0, 10**9))}.db"
    service = Service.start(load_settings(database_url=f"sqlite:///{database}"))
    try:
        history = happy_path("r-1") + happy_path("r-2")[:7]
        order = data.draw(st.permutations(history))
        for item in order:
            service.ingestion.submit([item])
        before = service.log.feed(0, 10_000)
        deal_before = service.log.deal("r-1")

        again = data.draw(st.lists(st.sampled_from(history), min_size=1, max_size=10))
        results = service.ingestion.submit(again)
        assert {r.status for r in results} == {"duplicate"}
        assert service.log.feed(0, 10_000) == before
        assert service.log.deal("r-1") == deal_before
    finally:
        service.engine.dispose()
