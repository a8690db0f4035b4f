"""`metrics rebuild` on SQLite and PostgreSQL, from the feed and from Kafka.

What an operator checks: while the rebuild runs the API answers from the
read models as they were; afterwards it answers from read models equal to a
clean projection of the whole history, including the events that arrived
during the rebuild; a rebuild that is killed leaves the read models as they
were and the same command resumes it; the status endpoint shows the
rebuild's progress.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from metrics.api import create_app
from metrics.cli import main as metrics_main
from metrics.errors import HistoryIncomplete
from metrics.feed import FeedSource
from metrics.processes import load_catalog
from metrics.progress import FeedProgress, KafkaOffsets
from metrics.rebuild import STAGING_SCHEMA, Rebuild, RebuildRefused, abandon
from metrics.settings import Settings
from metrics.storage import create_engine, migrate
from tests.integration.metrics.conftest import produce
from tests.integration.metrics.scenario import scenario
from tests.integration.metrics.test_feed_source import StubFeed
from tests.unit.metrics.conftest import Projected
from tests.unit.metrics.streams import Log

with warnings.catch_warnings():
    # kafka-python's own deprecated importlib call, on its first import
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import TopicPartition
    from kafka.admin import KafkaAdminClient

    from metrics.consumer import KafkaSource

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[3]
TABLES = {
    "deals": "deal_id",
    "stage_visits": "deal_id, seq",
    "parked_events": "id",
}


def history(deals: int) -> list[dict[str, Any]]:
    """The seven hand-made deals, then `deals` more that move and meet."""
    log = Log()
    for n in range(deals):
        deal = f"g{n:05d}"
        day = n % 40
        log.create(deal, day, owner=("ana", "bo", "cara")[n % 3], amount=100 + n)
        log.meeting(deal, day + 1, held=n % 4 != 0)
        if n % 3:
            log.advance_to(deal, "connecting", day + 2)
        if n % 5 == 0:
            log.lose(deal, day + 6, "price")
        elif n % 7 == 0:
            log.advance_to(deal, "won", day + 9)
    events = scenario() + log.events
    for position, event in enumerate(events, start=1):
        event["position"] = position
    return events


def snapshot(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """The read models as rows, without parking times and ids."""
    found: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as connection:
        for table, key in TABLES.items():
            columns = "*"
            if table == "parked_events":
                columns = "source, position, event_id, deal_id, event_type, error"
            found[table] = [
                tuple(row)
                for row in connection.exec_driver_sql(
                    f"SELECT {columns} FROM {table} ORDER BY {key}"
                )
            ]
    return found


def clean_projection(
    settings: Settings, events: list[dict[str, Any]], tmp_path: Path
) -> dict[str, list[tuple[Any, ...]]]:
    """The read models of the events projected once into an empty database."""
    engine = create_engine(
        settings, writer=True, url=f"sqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}"
    )
    migrate(engine)
    Projected(engine, load_catalog(settings.processes_dir)).apply(events)
    rows = snapshot(engine)
    engine.dispose()
    return rows


def damage(engine: sa.Engine) -> None:
    """What a projection bug leaves behind: wrong owners, lost visits."""
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE deals SET owner = 'nobody'")
        connection.exec_driver_sql("DELETE FROM stage_visits WHERE seq > 1")


def staging_exists(settings: Settings, engine: sa.Engine) -> bool:
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            query = "SELECT count(*) FROM pg_namespace WHERE nspname = %(n)s"
            found = connection.exec_driver_sql(query, {"n": STAGING_SCHEMA})
            return bool(found.scalar_one())
    database = Path(str(engine.url.database))
    return database.with_name(f"{database.stem}.rebuild{database.suffix}").exists()


def rebuild_row(engine: sa.Engine) -> dict[str, Any] | None:
    with engine.connect() as connection:
        row = connection.exec_driver_sql(
            "SELECT id, source, state, runs, done, total, events_applied "
            "FROM rebuilds ORDER BY id DESC LIMIT 1"
        ).first()
    return None if row is None else dict(row._mapping)


def kill_rebuild_part_way(
    engine: sa.Engine, source: str, after_events: int, settings: dict[str, str]
) -> str:
    """Run `metrics rebuild --source SOURCE` with the METRICS_* `settings`,
    SIGKILL it once it has applied `after_events`; its stderr."""
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("METRICS_")},
        **settings,
        "PYTHONPATH": f"{REPO / 'services'}{os.pathsep}{REPO}",
    }
    command = [sys.executable, "-m", "metrics.cli", "rebuild", "--source", source]
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(
            lambda: (
                (rebuild_row(engine) or {}).get("events_applied", 0) >= after_events
            ),
            "the rebuild to get going",
        )
    finally:
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=30)
    return stderr.decode(errors="replace")


class LiveFeedProjector:
    """The live projector, on a thread, as `metrics project --source feed`."""

    def __init__(self, settings: Settings, projected: Projected) -> None:
        self.source = FeedSource(
            settings,
            projected.projection,
            FeedProgress(projected.engine, settings.feed_url),
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.source.run, args=(self.stop,))
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive()


def wait_for(check: Any, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- from the feed -----------------------------------------------------------------


@pytest.fixture
def events() -> list[dict[str, Any]]:
    return history(300)


@pytest.fixture
def feed(events: list[dict[str, Any]]) -> Iterator[StubFeed]:
    stub = StubFeed(list(events))
    yield stub
    stub.close()


@pytest.fixture
def feed_settings(settings: Settings, feed: StubFeed) -> Settings:
    return settings.model_copy(update={"feed_url": feed.url, "feed_page_limit": 200})


def test_the_api_answers_from_the_old_read_models_until_the_switch(
    feed_settings: Settings,
    projected: Projected,
    feed: StubFeed,
    events: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    projected.apply(events)
    damage(projected.engine)
    damaged = snapshot(projected.engine)
    seen: dict[str, Any] = {}

    with TestClient(create_app(feed_settings, projected.catalog)) as client:

        def before_switch() -> None:
            # Caught up, not switched: the API still serves the damaged models.
            seen["snapshot"] = snapshot(projected.engine)
            seen["owners"] = client.get("/v1/metrics/velocity?group_by=owner").json()
            seen["status"] = client.get("/v1/projector/status").json()["rebuild"]
            seen["staged"] = staging_exists(feed_settings, projected.engine)

        summary = Rebuild(
            feed_settings, "feed", catalog=projected.catalog, on_caught_up=before_switch
        ).run(threading.Event())
        after = client.get("/v1/projector/status").json()["rebuild"]
        owners = client.get("/v1/metrics/velocity?group_by=owner").json()

    assert seen["snapshot"] == damaged
    assert [g["owner"] for g in seen["owners"]["groups"]] == ["nobody"]
    assert seen["status"]["state"] == "building"
    assert seen["status"]["done"] == seen["status"]["total"] == events[-1]["position"]
    assert seen["staged"]

    assert summary.state == "switched"
    assert summary.progress.events_applied == len(events)
    assert snapshot(projected.engine) == clean_projection(
        feed_settings, events, tmp_path
    )
    assert sorted(g["owner"] for g in owners["groups"]) == ["ana", "bo", "cara"]
    assert after["state"] == "switched"
    assert after["fraction_done"] == 1.0
    assert after["events_applied"] == len(events)
    assert not staging_exists(feed_settings, projected.engine)


def test_events_arriving_during_a_rebuild_reach_the_new_read_models(
    feed_settings: Settings,
    projected: Projected,
    feed: StubFeed,
    events: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    first = events[: len(events) // 2]
    feed.events[:] = first
    live = LiveFeedProjector(feed_settings, projected)
    try:
        wait_for(lambda: live.source.caught_up.is_set(), "the live projector")
        damage(projected.engine)

        def before_switch() -> None:
            # The rest of the history arrives after the rebuild caught up:
            # only the live projector reads it, into the read models it has.
            feed.events[:] = events
            wait_for(
                lambda: (
                    FeedProgress(projected.engine, feed.url).stored()
                    == events[-1]["position"]
                ),
                "the live projector to apply the new events",
            )

        summary = Rebuild(
            feed_settings, "feed", catalog=projected.catalog, on_caught_up=before_switch
        ).run(threading.Event())
        # The switch held the live projector and read on to where it was.
        assert summary.progress.last_position == events[-1]["position"]
        assert snapshot(projected.engine) == clean_projection(
            feed_settings, events, tmp_path
        )
        # And it goes on: an event after the switch reaches the new models.
        late = history(301)[len(events) :]
        feed.events.extend(late)
        wait_for(
            lambda: (
                FeedProgress(projected.engine, feed.url).stored()
                == late[-1]["position"]
            ),
            "the live projector to go on after the switch",
        )
    finally:
        live.close()

    assert snapshot(projected.engine) == clean_projection(
        feed_settings, events + late, tmp_path
    )


def test_events_arriving_throughout_the_switch_are_applied_once(
    feed_settings: Settings,
    projected: Projected,
    feed: StubFeed,
    events: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    first = events[: len(events) // 3]
    feed.events[:] = first
    settings = feed_settings.model_copy(
        update={"feed_page_limit": 40, "feed_poll_interval_ms": 20}
    )
    live = LiveFeedProjector(settings, projected)
    done = threading.Event()

    def crm() -> None:
        # The rest arrives a few events at a time, while the rebuild builds,
        # catches up and switches: live batches are in flight throughout.
        for start in range(len(first), len(events), 5):
            feed.events.extend(events[start : start + 5])
            time.sleep(0.01)
        done.set()

    writer = threading.Thread(target=crm)
    try:
        wait_for(lambda: live.source.caught_up.is_set(), "the live projector")
        writer.start()
        summary = Rebuild(settings, "feed", catalog=projected.catalog).run(
            threading.Event()
        )
        assert summary.state == "switched"
        writer.join(60)
        assert done.is_set()
        wait_for(
            lambda: (
                FeedProgress(projected.engine, feed.url).stored()
                == events[-1]["position"]
            ),
            "the live projector to apply the last event",
        )
    finally:
        live.close()

    assert snapshot(projected.engine) == clean_projection(
        feed_settings, events, tmp_path
    )
    # Every event counted once in the read models' own progress.
    assert projected.rows("SELECT events_applied FROM feed_position") == [
        (len(events),)
    ]


def test_a_killed_rebuild_leaves_the_read_models_and_resumes(
    feed_settings: Settings,
    projected: Projected,
    feed: StubFeed,
    events: list[dict[str, Any]],
    database_url: str,
    tmp_path: Path,
) -> None:
    projected.apply(events)
    damage(projected.engine)
    damaged = snapshot(projected.engine)
    feed.delay_s = 0.2
    stderr = kill_rebuild_part_way(
        projected.engine,
        "feed",
        200,
        {
            "METRICS_DATABASE_URL": database_url,
            "METRICS_PROCESSES_DIR": str(feed_settings.processes_dir),
            "METRICS_FEED_URL": feed.url,
            "METRICS_FEED_PAGE_LIMIT": "50",
        },
    )

    interrupted = rebuild_row(projected.engine)
    assert interrupted is not None and interrupted["state"] == "building", stderr
    assert snapshot(projected.engine) == damaged
    assert staging_exists(feed_settings, projected.engine)

    feed.delay_s = 0.0
    summary = Rebuild(feed_settings, "feed", catalog=projected.catalog).run(
        threading.Event()
    )
    assert summary.runs == 2
    assert summary.rebuild_id == interrupted["id"]
    assert summary.started_from >= 200
    assert summary.events_this_run == len(events) - summary.started_from
    assert summary.progress.events_applied == len(events)
    assert snapshot(projected.engine) == clean_projection(
        feed_settings, events, tmp_path
    )


def test_one_rebuild_at_a_time_and_a_different_one_only_by_starting_over(
    feed_settings: Settings,
    projected: Projected,
    feed: StubFeed,
    events: list[dict[str, Any]],
) -> None:
    stop = threading.Event()
    refused: list[str] = []

    def second_rebuild() -> None:
        with pytest.raises(RebuildRefused) as error:
            Rebuild(feed_settings, "feed", catalog=projected.catalog).run(stop)
        refused.append(str(error.value))
        stop.set()  # and stop the first one before its switch

    first = Rebuild(
        feed_settings, "feed", catalog=projected.catalog, on_caught_up=second_rebuild
    )
    stopped = first.run(stop)
    assert refused == ["another rebuild of these read models is running"]
    assert stopped.state == "building"

    # Resuming it from another source is refused; --restart starts over.
    with pytest.raises(RebuildRefused, match="resume it with --source feed"):
        Rebuild(feed_settings, "kafka", catalog=projected.catalog).run(stop)
    assert abandon(feed_settings) == stopped.rebuild_id
    assert not staging_exists(feed_settings, projected.engine)
    assert abandon(feed_settings) is None
    assert rebuild_row(projected.engine)["state"] == "abandoned"  # type: ignore[index]
    assert projected.rows("SELECT count(*) FROM deals") == [(0,)]


def test_the_command_prints_its_summary(
    feed_settings: Settings,
    projected: Projected,
    events: list[dict[str, Any]],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("METRICS_DATABASE_URL", database_url)
    monkeypatch.setenv("METRICS_PROCESSES_DIR", str(feed_settings.processes_dir))
    monkeypatch.setenv("METRICS_FEED_URL", feed_settings.feed_url)

    assert metrics_main(["rebuild", "--source", "feed", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["state"] == "switched"
    assert summary["events_applied"] == len(events)
    assert summary["done"] == summary["total"] == events[-1]["position"]
    assert projected.rows("SELECT count(*) FROM deals") == [(307,)]

    assert metrics_main(["rebuild", "--abandon"]) == 0
    assert "no rebuild was in progress" in capsys.readouterr().out


# -- from Kafka --------------------------------------------------------------------


def stored_offsets(engine: sa.Engine, topic: str) -> int:
    return sum(KafkaOffsets(engine, topic).stored(range(3)).values())


@pytest.mark.kafka
def test_a_rebuild_from_kafka_while_the_live_projector_goes_on(
    settings: Settings,
    projected: Projected,
    kafka_bootstrap: str,
    topic: str,
    events: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    settings = settings.model_copy(
        update={
            "kafka_bootstrap": kafka_bootstrap,
            "kafka_topic": topic,
            "kafka_group": f"live-{topic}",
            "batch_max_events": 200,
        }
    )
    first = events[: len(events) // 2]
    produce(kafka_bootstrap, topic, first)
    offsets = KafkaOffsets(projected.engine, topic)
    live = KafkaSource(settings, projected.projection, offsets)
    stop = threading.Event()
    thread = threading.Thread(target=live.run, args=(stop,))
    thread.start()
    try:
        wait_for(
            lambda: stored_offsets(projected.engine, topic) == len(first),
            "the live projector",
        )
        damage(projected.engine)

        def before_switch() -> None:
            produce(kafka_bootstrap, topic, events[len(first) :])
            wait_for(
                lambda: stored_offsets(projected.engine, topic) == len(events),
                "the live projector to apply the new events",
            )

        summary = Rebuild(
            settings, "kafka", catalog=projected.catalog, on_caught_up=before_switch
        ).run(threading.Event())
        # The switch held the live projector and read on to where it was.
        assert summary.state == "switched"
        assert summary.progress.done == len(events)
        assert snapshot(projected.engine) == clean_projection(
            settings, events, tmp_path
        )
        # And it goes on: events after the switch reach the new models.
        late = history(301)[len(events) :]
        produce(kafka_bootstrap, topic, late)
        wait_for(
            lambda: stored_offsets(projected.engine, topic) == len(events + late),
            "the live projector to go on after the switch",
        )
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert snapshot(projected.engine) == clean_projection(
        settings, events + late, tmp_path
    )


@pytest.mark.kafka
def test_a_killed_rebuild_from_kafka_resumes(
    settings: Settings,
    projected: Projected,
    kafka_bootstrap: str,
    topic: str,
    database_url: str,
    tmp_path: Path,
) -> None:
    events = history(3000)
    produce(kafka_bootstrap, topic, events)
    stderr = kill_rebuild_part_way(
        projected.engine,
        "kafka",
        500,
        {
            "METRICS_DATABASE_URL": database_url,
            "METRICS_PROCESSES_DIR": str(settings.processes_dir),
            "METRICS_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "METRICS_KAFKA_TOPIC": topic,
            "METRICS_BATCH_MAX_EVENTS": "100",
        },
    )
    interrupted = rebuild_row(projected.engine)
    assert interrupted is not None and interrupted["state"] == "building", stderr
    assert projected.rows("SELECT count(*) FROM deals") == [(0,)]

    settings = settings.model_copy(
        update={"kafka_bootstrap": kafka_bootstrap, "kafka_topic": topic}
    )
    summary = Rebuild(settings, "kafka", catalog=projected.catalog).run(
        threading.Event()
    )
    assert summary.runs == 2 and summary.started_from >= 500
    assert summary.progress.done == len(events)
    assert snapshot(projected.engine) == clean_projection(settings, events, tmp_path)


@pytest.mark.kafka
def test_a_topic_that_lost_its_beginning_is_refused(
    settings: Settings,
    projected: Projected,
    kafka_bootstrap: str,
    topic: str,
    events: list[dict[str, Any]],
) -> None:
    produce(kafka_bootstrap, topic, events)
    projected.apply(events)
    before = snapshot(projected.engine)
    # What retention does to an old topic: its first records are gone.
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.delete_records({TopicPartition(topic, 1): 5})
    admin.close()
    settings = settings.model_copy(
        update={"kafka_bootstrap": kafka_bootstrap, "kafka_topic": topic}
    )

    with pytest.raises(HistoryIncomplete, match="partition=1 begins at offset 5"):
        Rebuild(settings, "kafka", catalog=projected.catalog).run(threading.Event())
    assert snapshot(projected.engine) == before
