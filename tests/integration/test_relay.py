"""The relay against a real broker, on SQLite and on PostgreSQL.

What a consumer of `deal-events` relies on: every event of the log is on the
topic, keyed by its deal, as its envelope; one deal's events are on one
partition in stream order; a restart resumes where the relay stopped;
while one relay publishes, a second one only stands by; and an event Kafka
refuses for good stops the relay just below it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from progression.eventlog import NewEvent, RecordedEvent, StreamWrite
from progression.relay import PublishRefused, Relay
from progression.service import Service
from progression.settings import Settings, load_settings
from tests.eventlog_support import pending_summary

from .progression_support import event, happy_path

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.errors import UnknownTopicOrPartitionError

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

PARTITIONS = 3
WAIT_S = 45  # the longest any test waits for the relay or the broker
JOIN_S = 30


# -- helpers shared with the fault tests ---------------------------------------


@dataclass(frozen=True)
class Message:
    partition: int
    offset: int
    key: bytes
    value: dict[str, Any]


def new_topic() -> str:
    return f"deal-events-relay-{uuid.uuid4().hex[:10]}"


def delete_topic(bootstrap: str, topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        admin.delete_topics([topic])
    except UnknownTopicOrPartitionError:
        pass
    finally:
        admin.close()


def relay_settings(
    database_url: str, bootstrap: str, topic: str, **overrides: Any
) -> Settings:
    return load_settings(
        database_url=database_url,
        kafka_bootstrap=bootstrap,
        kafka_topic=topic,
        kafka_partitions=PARTITIONS,
        relay_poll_interval_ms=50,
        **overrides,
    )


def wait_for(
    condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s} s for {what}")
        time.sleep(0.05)


def recorded_position(engine: sa.Engine, topic: str) -> int | None:
    """What the relay_progress table says, as an operator would read it."""
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT position FROM relay_progress WHERE topic = :topic"),
            {"topic": topic},
        ).scalar_one_or_none()


def head_position(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.text("SELECT coalesce(max(position), 0) FROM events")
            ).scalar_one()
        )


def wait_until_published(engine: sa.Engine, topic: str, what: str) -> None:
    head = head_position(engine)
    wait_for(lambda: recorded_position(engine, topic) == head, what)


def read_topic(bootstrap: str, topic: str) -> list[Message]:
    """Every message on the topic, by partition and offset."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        request_timeout_ms=30_001,
    )
    try:
        deadline = time.monotonic() + WAIT_S
        partitions: list[TopicPartition] = []
        while not partitions:
            assert time.monotonic() < deadline, f"topic {topic} not found"
            numbers = consumer.partitions_for_topic(topic)
            partitions = [TopicPartition(topic, p) for p in sorted(numbers)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        messages: list[Message] = []
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            assert time.monotonic() < deadline, "the topic could not be read in time"
            for tp, records in consumer.poll(timeout_ms=500).items():
                messages += [
                    Message(tp.partition, r.offset, r.key, json.loads(r.value))
                    for r in records
                ]
        return sorted(messages, key=lambda m: (m.partition, m.offset))
    finally:
        consumer.close()


def topic_partitions(bootstrap: str, topic: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        [described] = admin.describe_topics([topic])
        return len(described["partitions"])
    finally:
        admin.close()


def check_keys_values_and_order(
    messages: Sequence[Message], logged: Sequence[RecordedEvent]
) -> None:
    """Each message is a logged event's envelope, keyed by its deal, in order."""
    by_id = {e.event_id: e for e in logged}
    for message in messages:
        recorded = by_id[message.value["event_id"]]
        assert message.key == recorded.deal_id.encode("utf-8")
        assert message.value == recorded.envelope()

    on_partition: dict[str, set[int]] = defaultdict(set)
    for message in messages:
        on_partition[message.value["deal_id"]].add(message.partition)
    assert {deal: len(p) for deal, p in on_partition.items() if len(p) > 1} == {}


def check_exactly_once(
    messages: Sequence[Message], logged: Sequence[RecordedEvent]
) -> None:
    """Every logged event once, in position order on each partition."""
    check_keys_values_and_order(messages, logged)
    counts = Counter(m.value["event_id"] for m in messages)
    assert {e: n for e, n in counts.items() if n > 1} == {}
    assert sorted(counts) == sorted(e.event_id for e in logged)
    for partition in {m.partition for m in messages}:
        positions = [m.value["position"] for m in messages if m.partition == partition]
        assert positions == sorted(positions), f"partition {partition} out of order"
    versions: dict[str, list[int]] = defaultdict(list)
    for message in messages:
        versions[message.value["deal_id"]].append(message.value["stream_version"])
    for deal_id, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), deal_id


class RelayThread:
    """A relay running in a thread of the test, stopped as the command is."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.relay.run(self._stop)
        except BaseException as error:
            self.error = error

    def start(self) -> RelayThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(JOIN_S)
        assert not self._thread.is_alive(), "the relay did not stop"
        assert self.error is None

    def ended(self) -> bool:
        return not self._thread.is_alive()


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


def submit_interleaved(service: Service, deal_ids: Sequence[str]) -> None:
    """Every deal's happy path, one step of every deal per request."""
    paths = [happy_path(deal_id) for deal_id in deal_ids]
    for step in range(len(paths[0])):
        results = service.ingestion.submit([path[step] for path in paths])
        assert {r.status for r in results} == {"created"}, results


# -- tests ---------------------------------------------------------------------


def test_every_event_is_published_once_keyed_by_deal_in_stream_order(
    service: Service, database_url: str, kafka_bootstrap: str, topic: str
) -> None:
    submit_interleaved(service, [f"deal-{n}" for n in range(12)])
    logged = service.log.feed(0, 100_000)
    settings = relay_settings(database_url, kafka_bootstrap, topic)

    relay = RelayThread(Relay(service.engine, settings)).start()
    wait_until_published(service.engine, topic, "the relay to publish the log")
    relay.stop()

    messages = read_topic(kafka_bootstrap, topic)
    assert len(messages) == len(logged)
    check_exactly_once(messages, logged)
    assert topic_partitions(kafka_bootstrap, topic) == PARTITIONS
    assert len({m.partition for m in messages}) > 1
    # A deal's events are in stream order on its partition, decisions included.
    created = next(m for m in messages if m.value["event_id"] == "deal-3-created")
    assert created.value["stream_version"] == 1
    assert created.value["type"] == "deal.created"


def test_a_restarted_relay_resumes_from_its_recorded_position(
    service: Service, database_url: str, kafka_bootstrap: str, topic: str
) -> None:
    settings = relay_settings(database_url, kafka_bootstrap, topic, relay_batch_size=7)
    submit_interleaved(service, ["early-1", "early-2"])

    first = RelayThread(Relay(service.engine, settings)).start()
    wait_until_published(service.engine, topic, "the first run to publish")
    first.stop()
    stopped_at = recorded_position(service.engine, topic)

    submit_interleaved(service, ["late-1", "late-2", "late-3"])
    assert head_position(service.engine) > (stopped_at or 0)
    second = Relay(service.engine, settings)
    running = RelayThread(second).start()
    wait_until_published(service.engine, topic, "the second run to publish")
    running.stop()

    logged = service.log.feed(0, 100_000)
    check_exactly_once(read_topic(kafka_bootstrap, topic), logged)
    assert second.published == len([e for e in logged if e.position > stopped_at])


def test_events_from_concurrent_writers_all_reach_kafka(
    service: Service, database_url: str, kafka_bootstrap: str, topic: str
) -> None:
    # Writers contend on one hot deal and write their own deals, while the
    # relay follows the log; an append that commits late must still be sent.
    writers = 8
    per_writer = 30
    failures: list[BaseException] = []
    service.ingestion.submit([event("hot-created", "deal.created", "hot", 0)])
    settings = relay_settings(database_url, kafka_bootstrap, topic, relay_batch_size=5)
    relay = RelayThread(Relay(service.engine, settings)).start()

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
        except BaseException as error:  # reported by the test's thread
            failures.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    wait_until_published(service.engine, topic, "the relay to catch up")
    relay.stop()

    logged = service.log.feed(0, 100_000)
    assert len(logged) > writers * per_writer
    check_exactly_once(read_topic(kafka_bootstrap, topic), logged)


def test_a_second_relay_stands_by_and_takes_over_when_the_first_stops(
    service: Service,
    database_url: str,
    kafka_bootstrap: str,
    topic: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="progression.relay")
    settings = relay_settings(database_url, kafka_bootstrap, topic)
    first, second = Relay(service.engine, settings), Relay(service.engine, settings)
    submit_interleaved(service, ["before-1", "before-2"])

    running_first = RelayThread(first).start()
    wait_until_published(service.engine, topic, "the first relay to publish")
    running_second = RelayThread(second).start()
    wait_for(
        lambda: any("relay standing by" in r.getMessage() for r in caplog.records),
        "the second relay to stand by",
    )
    submit_interleaved(service, ["during-1"])
    wait_until_published(service.engine, topic, "the first relay to go on")
    assert first.active.is_set()
    assert not second.active.is_set()
    assert second.published == 0

    running_first.stop()
    wait_for(second.active.is_set, "the second relay to take over", timeout_s=15)
    submit_interleaved(service, ["after-1", "after-2"])
    wait_until_published(service.engine, topic, "the second relay to publish")
    running_second.stop()

    logged = service.log.feed(0, 100_000)
    check_exactly_once(read_topic(kafka_bootstrap, topic), logged)
    after = [e for e in logged if e.deal_id.startswith("after-")]
    assert second.published == len(after)


def test_an_event_kafka_refuses_stops_the_relay_just_below_it(
    service: Service,
    database_url: str,
    kafka_bootstrap: str,
    topic: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="progression.relay")
    submit_interleaved(service, ["small-1"])
    below = head_position(service.engine)
    # Over the producer's 1 MiB request limit. Appended to the log directly,
    # past the contract's checks: only what Kafka makes of it matters here.
    huge = NewEvent(
        event_id="huge-1",
        type="email.opened",
        deal_id="huge",
        occurred_at=service.ingestion.clock(),
        data={"text": "x" * 1_100_000},
        digest="ab" * 32,
    )
    service.log.append([StreamWrite("huge", 0, [huge], pending_summary("huge"))])
    submit_interleaved(service, ["small-2"])

    settings = relay_settings(database_url, kafka_bootstrap, topic)
    relay = RelayThread(Relay(service.engine, settings)).start()
    wait_for(relay.ended, "the relay to give up")

    assert isinstance(relay.error, PublishRefused)
    assert relay.error.event_id == "huge-1"
    assert recorded_position(service.engine, topic) == below
    [line] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "event_id=huge-1" in line.getMessage()
    assert f"topic={topic}" in line.getMessage()
    published = service.log.feed(0, 100_000)
    check_exactly_once(
        read_topic(kafka_bootstrap, topic),
        [e for e in published if e.position <= below],
    )
