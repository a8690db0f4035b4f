"""The Kafka source against a real broker: offsets stored with the read
models, a restart that counts nothing twice, partitions split by deal."""

from __future__ import annotations

import threading
import time
import uuid
import warnings

import pytest

from metrics.consumer import KafkaSource
from metrics.progress import KafkaOffsets
from metrics.settings import Settings
from tests.integration.metrics.conftest import produce
from tests.integration.metrics.scenario import scenario
from tests.unit.metrics.conftest import Projected

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    found = consumer.end_offsets([TopicPartition(topic, p) for p in range(3)])
    consumer.close()
    return {tp.partition: offset for tp, offset in found.items()}


def run_until(
    settings: Settings, projected: Projected, ends: dict[int, int]
) -> KafkaSource:
    offsets = KafkaOffsets(projected.engine, settings.kafka_topic)
    source = KafkaSource(settings, projected.projection, offsets)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,))
    thread.start()
    try:
        wanted = {p: o for p, o in ends.items() if o}
        deadline = time.monotonic() + 60
        while offsets.stored(wanted) != wanted:
            assert time.monotonic() < deadline, offsets.stored(wanted)
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    return source


def test_the_topic_is_projected_and_a_restart_counts_nothing_twice(
    settings: Settings, projected: Projected, kafka_bootstrap: str, topic: str
) -> None:
    settings = settings.model_copy(
        update={
            "kafka_bootstrap": kafka_bootstrap,
            "kafka_topic": topic,
            "kafka_group": f"metrics-test-{uuid.uuid4().hex[:8]}",
        }
    )
    events = scenario()
    produce(kafka_bootstrap, topic, events)
    ends = end_offsets(kafka_bootstrap, topic)
    assert sum(ends.values()) == len(events)

    source = run_until(settings, projected, ends)
    assert source.applied == len(events)
    stored = projected.rows(
        "SELECT partition, next_offset, events_applied "
        "FROM consumer_offsets ORDER BY partition"
    )
    assert [(p, o) for p, o, _ in stored] == sorted(
        (p, o) for p, o in ends.items() if o
    )
    assert sum(applied for _, _, applied in stored) == len(events)
    before = projected.rows("SELECT * FROM stage_visits ORDER BY deal_id, seq")

    # The relay sends everything again (at least once) plus one new event.
    last = events[-1]
    meeting = dict(
        last,
        event_id="late-meeting",
        type="meeting.held",
        data={},
        position=last["position"] + 1,
        stream_version=last["stream_version"] + 1,
    )
    produce(kafka_bootstrap, topic, [*events, meeting])
    source = run_until(settings, projected, end_offsets(kafka_bootstrap, topic))

    assert source.applied == 1
    assert projected.rows("SELECT * FROM stage_visits ORDER BY deal_id, seq") == before
    assert projected.rows("SELECT meetings_held FROM deals WHERE deal_id = 'd7'") == [
        (1,)
    ]
    assert projected.rows(
        "SELECT status, count(*) FROM deals GROUP BY status ORDER BY status"
    ) == [("disqualified", 1), ("lost", 2), ("open", 2), ("won", 2)]
    assert projected.rows("SELECT sum(events_skipped) FROM consumer_offsets") == [
        (len(events),)
    ]


def test_a_projector_started_before_its_topic_exists_waits_for_it(
    settings: Settings,
    projected: Projected,
    kafka_bootstrap: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = f"deal-events-later-{uuid.uuid4().hex[:10]}"
    settings = settings.model_copy(
        update={
            "kafka_bootstrap": kafka_bootstrap,
            "kafka_topic": name,
            "kafka_group": f"metrics-test-{uuid.uuid4().hex[:8]}",
        }
    )
    source = KafkaSource(
        settings, projected.projection, KafkaOffsets(projected.engine, name)
    )
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,))
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        with caplog.at_level("INFO"):
            thread.start()
            time.sleep(3)  # the projector is up, the topic is not
            admin.create_topics(
                [NewTopic(name, num_partitions=3, replication_factor=1)]
            )
            events = scenario()
            produce(kafka_bootstrap, name, events)
            deadline = time.monotonic() + 60
            while source.applied < len(events):
                assert time.monotonic() < deadline, source.applied
                time.sleep(0.1)
    finally:
        stop.set()
        thread.join(30)
        admin.delete_topics([name])
        admin.close()
    assert not thread.is_alive()
    waiting = [r for r in caplog.records if "waiting for the topic" in r.getMessage()]
    assert len(waiting) == 1  # said once, not at every metadata refresh
    assert not [r for r in caplog.records if "not found in cluster" in r.getMessage()]
