"""`progression replay` against a real broker, on SQLite and on PostgreSQL.

What an operator replaying part of the log relies on: the range asked for,
and only it, lands on the topic keyed by deal like the relay's messages,
in position order on each partition; a stopped replay resumes after what
Kafka acknowledged, without a gap; a complete one publishes nothing more
unless restarted; and a range that reaches Kafka twice projects into the
same read models as once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from metrics.api import create_app as create_metrics_app
from metrics.settings import Settings as MetricsSettings
from progression.db import create_engine, migrate
from progression.eventlog import (
    EventLog,
    RecordedEvent,
)
from progression.replay import (
    ReplayFailed,
    ReplayRange,
    ReplaySummary,
    ReplayTakenOver,
    replay,
)
from progression.service import Service
from progression.settings import load_settings
from tests.eventlog_support import LogWriter

from .progression_support import happy_path
from .test_relay import (
    JOIN_S,
    Message,
    check_exactly_once,
    delete_topic,
    head_position,
    read_topic,
    topic_partitions,
    wait_for,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka.partitioner.default import murmur2

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 3
COMMAND_TIMEOUT_S = 120


# -- helpers shared with the fault tests ---------------------------------------


def new_topic() -> str:
    return f"deal-events-replay-{uuid.uuid4().hex[:10]}"


def replay_env(
    database_url: str, bootstrap: str, folder: Path, **extra: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESSION_")}
    env.update(
        PROGRESSION_DATABASE_URL=database_url,
        PROGRESSION_KAFKA_BOOTSTRAP=bootstrap,
        PROGRESSION_KAFKA_PARTITIONS=str(PARTITIONS),
        PROGRESSION_LOG_LEVEL="INFO",
        DEALLEDGER_DATA_DIR=str(folder / "data"),
        **extra,
    )
    return env


def command(name: str) -> str:
    """An installed console script of the project, next to this Python."""
    path = Path(sys.executable).with_name(name)
    assert path.exists(), f"{path} is missing: install the project"
    return str(path)


def run_replay(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`progression replay ARGS` to the end; its output as text."""
    return subprocess.run(
        [command("progression"), "replay", *args],
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def start_replay(
    env: dict[str, str], log_file: Path, *args: str
) -> subprocess.Popen[bytes]:
    """`progression replay ARGS` as a process of its own, output to a file."""
    with log_file.open("ab") as output:
        return subprocess.Popen(
            [command("progression"), "replay", *args],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(JOIN_S)


def progress_rows(engine: sa.Engine, topic: str) -> list[dict[str, Any]]:
    """The replay_progress rows of a topic, as an operator would read them."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT replay_id, from_position, to_position, position, published, "
                "completed_at FROM replay_progress WHERE topic = :topic"
            ),
            {"topic": topic},
        ).mappings()
        return [dict(row) for row in rows]


def recorded_position(engine: sa.Engine, topic: str) -> int:
    rows = progress_rows(engine, topic)
    return int(rows[0]["position"]) if rows else 0


def relay_partition(deal_id: str, partitions: int) -> int:
    """Where the relay puts a deal: the Java client's default for the key."""
    return int(murmur2(deal_id.encode("utf-8")) & 0x7FFFFFFF) % partitions


def deduplicated(messages: Sequence[Message]) -> set[tuple[str, int]]:
    return {(m.value["deal_id"], m.value["stream_version"]) for m in messages}


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def service(database_url: str) -> Iterator[Service]:
    service = Service.start(load_settings(database_url=database_url))
    yield service
    service.engine.dispose()


@pytest.fixture
def topic(kafka_bootstrap: str) -> Iterator[str]:
    name = new_topic()
    yield name
    delete_topic(kafka_bootstrap, name)


@pytest.fixture
def env(database_url: str, kafka_bootstrap: str, tmp_path: Path) -> dict[str, str]:
    return replay_env(database_url, kafka_bootstrap, tmp_path)


def submit_histories(service: Service, paths: Sequence[Sequence[dict]]) -> None:
    """Every deal's inputs, one step of every deal per request."""
    for step in range(max(len(path) for path in paths)):
        batch = [path[step] for path in paths if step < len(path)]
        results = service.ingestion.submit(batch)
        assert {r.status for r in results} == {"created"}, results


def some_deals(service: Service, count: int = 12) -> list[RecordedEvent]:
    """Every third deal won, the others stopped part way; the log they make."""
    paths = [happy_path(f"deal-{n}", owner=f"rep-{n % 4}") for n in range(count)]
    paths = [path if n % 3 == 0 else path[: 3 + n % 10] for n, path in enumerate(paths)]
    submit_histories(service, paths)
    return service.log.feed(0, 100_000)


def check_in_order_keyed_like_the_relay(messages: Sequence[Message]) -> None:
    """The relay's key and partition, and position order on each partition."""
    for message in messages:
        deal_id = message.value["deal_id"]
        assert message.key == deal_id.encode("utf-8")
        assert message.partition == relay_partition(deal_id, PARTITIONS)
    for partition in {m.partition for m in messages}:
        positions = [m.value["position"] for m in messages if m.partition == partition]
        assert positions == sorted(positions), f"partition {partition} out of order"


# -- tests ---------------------------------------------------------------------


def test_a_full_range_lands_in_position_order_keyed_like_the_relay(
    service: Service, env: dict[str, str], kafka_bootstrap: str, topic: str
) -> None:
    logged = some_deals(service)
    head = logged[-1].position

    done = run_replay(env, "--to-topic", topic)

    assert done.returncode == 0, done.stderr
    assert f"published {len(logged):,} events to {topic} (positions 1 to " in (
        done.stdout
    )
    assert f"complete: all {len(logged):,} events of positions 1 to" in done.stdout
    messages = read_topic(kafka_bootstrap, topic)
    check_exactly_once(messages, logged)
    check_in_order_keyed_like_the_relay(messages)
    assert len({m.partition for m in messages}) > 1
    assert topic_partitions(kafka_bootstrap, topic) == PARTITIONS
    [row] = progress_rows(service.engine, topic)
    assert (row["from_position"], row["to_position"]) == (1, head)
    assert (row["position"], row["published"]) == (head, len(logged))
    assert row["completed_at"] is not None


def test_a_sub_range_publishes_those_positions_and_no_others(
    service: Service, env: dict[str, str], kafka_bootstrap: str, topic: str
) -> None:
    logged = some_deals(service)
    first, last = logged[20].position, logged[-21].position
    wanted = [e for e in logged if first <= e.position <= last]

    done = run_replay(
        env,
        "--to-topic",
        topic,
        "--from-position",
        str(first),
        "--to-position",
        str(last),
    )

    assert done.returncode == 0, done.stderr
    assert f"(positions {first:,} to {last:,})" in done.stdout
    messages = read_topic(kafka_bootstrap, topic)
    assert [m.value["position"] for m in messages] != []
    assert sorted(m.value["position"] for m in messages) == [e.position for e in wanted]
    by_id = {e.event_id: e for e in wanted}
    assert all(m.value == by_id[m.value["event_id"]].envelope() for m in messages)
    check_in_order_keyed_like_the_relay(messages)
    # The relay's own position is not the replay's business.
    with service.engine.connect() as connection:
        relayed = connection.execute(sa.text("SELECT count(*) FROM relay_progress"))
        assert relayed.scalar_one() == 0


def test_a_single_deal_publishes_its_stream_in_order_on_its_partition(
    service: Service, env: dict[str, str], kafka_bootstrap: str, topic: str
) -> None:
    logged = some_deals(service)
    stream = [e for e in logged if e.deal_id == "deal-3"]
    assert len(stream) > 10  # inputs and the stage changes they caused

    done = run_replay(env, "--to-topic", topic, "--deal", "deal-3")
    assert done.returncode == 0, done.stderr
    assert f"all {len(stream)} events of positions 1 to" in done.stdout
    assert "of deal deal-3 are on the topic" in done.stdout

    # From a later position on, only that part of the stream, to another
    # replay of its own.
    later = stream[5].position
    again = run_replay(
        env, "--to-topic", topic, "--deal", "deal-3", "--from-position", str(later)
    )
    assert again.returncode == 0, again.stderr

    messages = read_topic(kafka_bootstrap, topic)
    assert [m.value for m in messages] == [e.envelope() for e in stream] + [
        e.envelope() for e in stream[5:]
    ]
    assert {m.key for m in messages} == {b"deal-3"}
    assert {m.partition for m in messages} == {relay_partition("deal-3", PARTITIONS)}
    assert [m.value["stream_version"] for m in messages[: len(stream)]] == list(
        range(1, len(stream) + 1)
    )
    assert len(progress_rows(service.engine, topic)) == 2


def test_a_stopped_replay_resumes_after_what_kafka_acknowledged_without_gaps(
    database_url: str, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    engine = create_engine(database_url)
    migrate(engine)
    writer = LogWriter(EventLog(engine), deals=100)
    for _ in range(20):
        writer.append_round(10)  # 20,000 events, deals interleaved
    head = head_position(engine)
    # Small batches: the stop comes while most of the range is still to go.
    env = replay_env(
        database_url, kafka_bootstrap, tmp_path, PROGRESSION_RELAY_BATCH_SIZE="100"
    )

    running = start_replay(env, tmp_path / "first.log", "--to-topic", topic)
    try:
        wait_for(lambda: recorded_position(engine, topic) > 0, "the replay to record")
        running.send_signal(signal.SIGTERM)
        assert running.wait(JOIN_S) == 128 + signal.SIGTERM
    finally:
        end(running)
    first_output = (tmp_path / "first.log").read_text()
    [row] = progress_rows(engine, topic)
    stopped_at = int(row["position"])
    assert 0 < stopped_at < head, "not stopped part way"
    assert row["completed_at"] is None
    assert f"stopped at position {stopped_at:,}" in first_output
    assert "run the same command again to resume" in first_output

    # A clean stop settles what is in flight: the topic holds exactly the
    # events up to the recorded position.
    logged = EventLog(engine).feed(0, 1_000_000)
    before = read_topic(kafka_bootstrap, topic)
    check_exactly_once(before, [e for e in logged if e.position <= stopped_at])

    done = run_replay(env, "--to-topic", topic)
    assert done.returncode == 0, done.stderr
    rest = len([e for e in logged if e.position > stopped_at])
    assert f"published {rest:,} events to {topic}" in done.stdout
    assert f"resumed after position {stopped_at:,}" in done.stdout

    messages = read_topic(kafka_bootstrap, topic)
    check_exactly_once(messages, logged)
    check_in_order_keyed_like_the_relay(messages)
    [row] = progress_rows(engine, topic)
    assert (row["position"], row["published"]) == (head, len(logged))
    engine.dispose()


def test_a_complete_replay_publishes_nothing_more_until_restarted(
    service: Service, env: dict[str, str], kafka_bootstrap: str, topic: str
) -> None:
    logged = some_deals(service)
    assert run_replay(env, "--to-topic", topic).returncode == 0

    again = run_replay(env, "--to-topic", topic)
    assert again.returncode == 0, again.stderr
    assert "published 0 events" in again.stdout
    assert "was already complete" in again.stdout
    assert len(read_topic(kafka_bootstrap, topic)) == len(logged)

    restarted = run_replay(env, "--to-topic", topic, "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert f"published {len(logged):,} events" in restarted.stdout
    messages = read_topic(kafka_bootstrap, topic)
    # At least once: Kafka holds the range twice; deduplicated, it is the log.
    assert Counter(Counter(m.value["event_id"] for m in messages).values()) == {
        2: len(logged)
    }
    assert deduplicated(messages) == {(e.deal_id, e.stream_version) for e in logged}
    # Each partition holds its events in position order, then all of them
    # again in the same order.
    for partition in {m.partition for m in messages}:
        positions = [m.value["position"] for m in messages if m.partition == partition]
        half = len(positions) // 2
        assert positions[:half] == positions[half:] == sorted(positions[:half])


def test_a_range_replayed_twice_projects_the_same_funnel_as_once(
    service: Service,
    env: dict[str, str],
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    logged = some_deals(service, count=24)
    once, twice = new_topic(), new_topic()
    try:
        assert run_replay(env, "--to-topic", once).returncode == 0
        assert run_replay(env, "--to-topic", twice).returncode == 0
        assert run_replay(env, "--to-topic", twice, "--restart").returncode == 0
        assert len(read_topic(kafka_bootstrap, twice)) == 2 * len(logged)

        projected_once = project(kafka_bootstrap, once, tmp_path / "once")
        projected_twice = project(kafka_bootstrap, twice, tmp_path / "twice")
    finally:
        delete_topic(kafka_bootstrap, once)
        delete_topic(kafka_bootstrap, twice)

    # The second copy of every event was skipped, and changed nothing.
    assert projected_once["skipped"] == 0
    assert projected_twice["skipped"] == len(logged)
    assert projected_twice["funnel"] == projected_once["funnel"]
    assert projected_twice["outcomes"] == projected_once["outcomes"]
    funnel = projected_once["funnel"]
    entered = {stage["stage"]: stage["entered"] for stage in funnel["stages"]}
    assert entered["prospecting"] == 24
    assert projected_once["outcomes"]["won"] == 8  # every third deal went all the way


def project(bootstrap: str, topic: str, folder: Path) -> dict[str, Any]:
    """`metrics project --source kafka` over the whole topic into a fresh
    database; then the funnel and outcomes its API answers."""
    folder.mkdir()
    database_url = f"sqlite:///{folder / 'metrics.db'}"
    on_topic = len(read_topic(bootstrap, topic))
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRICS_")}
    env.update(
        METRICS_DATABASE_URL=database_url,
        METRICS_KAFKA_BOOTSTRAP=bootstrap,
        METRICS_KAFKA_TOPIC=topic,
        METRICS_KAFKA_GROUP=f"replay-test-{uuid.uuid4().hex[:8]}",
        DEALLEDGER_DATA_DIR=str(folder),
    )
    engine = sa.create_engine(database_url)

    def consumed() -> int:
        try:
            with engine.connect() as connection:
                return int(
                    connection.execute(
                        sa.text(
                            "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets"
                        )
                    ).scalar_one()
                )
        except sa.exc.OperationalError:  # not migrated yet
            return 0

    with (folder / "project.log").open("wb") as output:
        projector = subprocess.Popen(
            [command("metrics"), "project", "--source", "kafka"],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: consumed() == on_topic, "the projector to reach the end")
        projector.send_signal(signal.SIGTERM)
        assert projector.wait(JOIN_S) == 0
    finally:
        end(projector)
    with engine.connect() as connection:
        skipped = connection.execute(
            sa.text("SELECT sum(events_skipped) FROM consumer_offsets")
        ).scalar_one()
        parked = connection.execute(
            sa.text("SELECT count(*) FROM parked_events")
        ).scalar_one()
    engine.dispose()
    assert parked == 0

    settings = MetricsSettings(database_url=database_url, kafka_bootstrap=bootstrap)
    with TestClient(create_metrics_app(settings)) as client:
        funnel = client.get("/v1/metrics/funnel")
        outcomes = client.get("/v1/metrics/outcomes")
    assert funnel.status_code == 200, funnel.text
    assert outcomes.status_code == 200, outcomes.text
    return {
        "funnel": funnel.json(),
        "outcomes": outcomes.json(),
        "skipped": int(skipped or 0),
    }


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        (["--to-topic", "two words"], "--to-topic: 'two words' is not a Kafka topic"),
        (["--to-topic", "t", "--from-position", "0"], "--from-position: must be 1"),
        (
            ["--to-topic", "t", "--from-position", "9", "--to-position", "3"],
            "--to-position: must be at least the first position (9), not 3",
        ),
        (["--to-topic", "t", "--to-position", "100000"], "--to-position: 100000 is"),
        (["--to-topic", "t", "--from-position", "100000"], "--from-position: 100000"),
        (["--to-topic", "t", "--deal", "nobody"], "--deal: no deal 'nobody' in the"),
    ],
)
def test_a_range_the_log_cannot_give_is_refused_naming_the_option(
    service: Service, env: dict[str, str], arguments: list[str], error: str
) -> None:
    some_deals(service, count=2)

    refused = run_replay(env, *arguments)

    assert refused.returncode == 2
    assert f"progression replay: {error}" in refused.stderr
    assert refused.stdout == ""
    with service.engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT count(*) FROM replay_progress"))
        assert rows.scalar_one() == 0


def test_the_replay_id_names_the_arguments_whatever_the_order_of_deals(
    service: Service, env: dict[str, str], topic: str
) -> None:
    some_deals(service, count=3)
    first = run_replay(env, "--to-topic", topic, "--deal", "deal-1", "--deal", "deal-2")
    second = run_replay(
        env, "--to-topic", topic, "--deal", "deal-2", "--deal", "deal-1"
    )

    assert first.returncode == second.returncode == 0
    assert "was already complete" in second.stdout
    [row] = progress_rows(service.engine, topic)
    assert row["replay_id"] in first.stdout
    with service.engine.connect() as connection:
        deals = connection.execute(sa.text("SELECT deal_ids FROM replay_progress"))
        stored = deals.scalar_one()
    assert (json.loads(stored) if isinstance(stored, str) else stored) == [
        "deal-1",
        "deal-2",
    ]


def test_a_second_run_of_the_same_replay_takes_it_over_and_the_first_stops(
    service: Service, database_url: str, kafka_bootstrap: str, topic: str
) -> None:
    logged = some_deals(service)
    settings = load_settings(
        database_url=database_url,
        kafka_bootstrap=kafka_bootstrap,
        kafka_partitions=PARTITIONS,
        relay_batch_size=20,
    )
    wanted = ReplayRange(topic)
    second: list[ReplaySummary] = []

    def start_another(done: int, _total: int | None) -> None:
        # Once the first run has recorded a batch, a second one starts.
        if done and not second:
            second.append(replay(service.engine, settings, wanted))

    with pytest.raises(ReplayFailed) as failed:
        replay(service.engine, settings, wanted, report=start_another)

    assert isinstance(failed.value.cause, ReplayTakenOver)
    assert failed.value.summary.events >= 20  # acknowledged before it stopped
    [taken_over] = second
    assert taken_over.complete
    assert taken_over.resumed_after == 20
    assert taken_over.events == len(logged) - 20
    messages = read_topic(kafka_bootstrap, topic)
    assert deduplicated(messages) == {(e.deal_id, e.stream_version) for e in logged}
    [row] = progress_rows(service.engine, topic)
    assert row["position"] == logged[-1].position
    assert row["completed_at"] is not None
