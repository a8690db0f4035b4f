"""`progression replay` killed with SIGKILL part way, then run again.

A killed replay cannot settle what it had in flight, so the rerun may send
some events a second time (at least once). Afterwards the topic must hold
every event of the range, and, deduplicated by (deal_id, stream_version) as
consumers do, exactly the range: nothing from before it, nothing appended
after the replay started.
"""

from __future__ import annotations

import signal
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa

from progression.eventlog import EventLog, RecordedEvent
from tests.eventlog_support import LogWriter
from tests.integration.test_relay import (
    JOIN_S,
    Message,
    delete_topic,
    head_position,
    read_topic,
    wait_for,
)
from tests.integration.test_replay import (
    PARTITIONS,
    deduplicated,
    end,
    new_topic,
    progress_rows,
    recorded_position,
    relay_partition,
    replay_env,
    run_replay,
    start_replay,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(180)]

FIRST = 2_001  # the range starts here and ends at the head when first run


def check_at_least_once_in_stream_order(
    messages: Sequence[Message], wanted: Sequence[RecordedEvent]
) -> None:
    """Every event wanted, as the relay sends it; nothing else; and a consumer
    that skips what it has applied sees each deal's part of the range in
    stream order, without a gap."""
    envelopes = {(e.deal_id, e.stream_version): e.envelope() for e in wanted}
    for message in messages:
        deal_id = message.value["deal_id"]
        assert message.key == deal_id.encode("utf-8")
        assert message.partition == relay_partition(deal_id, PARTITIONS)
        identity = (deal_id, message.value["stream_version"])
        assert message.value == envelopes[identity]  # a repeat is the same event
    assert deduplicated(messages) == set(envelopes)

    expected: dict[str, list[int]] = defaultdict(list)
    for event in wanted:
        expected[event.deal_id].append(event.stream_version)
    applied: dict[str, list[int]] = defaultdict(list)
    for message in messages:
        versions = applied[message.value["deal_id"]]
        version = message.value["stream_version"]
        if not versions or version > versions[-1]:
            versions.append(version)
    assert applied == expected


def test_a_replay_killed_part_way_and_run_again_leaves_the_range_on_the_topic(
    engine: sa.Engine, database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = new_topic()
    writer = LogWriter(EventLog(engine), deals=200)
    for _ in range(16):
        writer.append_round(10)  # 32,000 events, deals interleaved
    head = head_position(engine)
    env = replay_env(database_url, kafka_bootstrap, tmp_path)
    arguments = ("--to-topic", topic, "--from-position", str(FIRST))

    first = start_replay(env, tmp_path / "first.log", *arguments)
    try:
        wait_for(
            lambda: recorded_position(engine, topic) > FIRST,
            "the replay to record a position",
        )
        first.send_signal(signal.SIGKILL)
        assert first.wait(JOIN_S) == -signal.SIGKILL
    finally:
        end(first)
    killed_at = recorded_position(engine, topic)
    assert FIRST < killed_at < head, "not killed part way"

    # Events keep arriving; the range still ends where the first run said.
    writer.append_round(5)
    try:
        done = run_replay(env, *arguments)
        assert done.returncode == 0, done.stderr
        assert f"resumed after position {killed_at:,}" in done.stdout
        messages = read_topic(kafka_bootstrap, topic)
    finally:
        delete_topic(kafka_bootstrap, topic)

    logged = EventLog(engine).feed(0, 1_000_000)
    wanted = [e for e in logged if FIRST <= e.position <= head]
    assert len(wanted) == head - FIRST + 1 == 30_000
    check_at_least_once_in_stream_order(messages, wanted)
    copies = Counter(m.value["event_id"] for m in messages)
    assert copies.keys() == {e.event_id for e in wanted}
    # Only what the killed run had in flight can be there twice.
    assert all(copies[e.event_id] == 1 for e in wanted if e.position <= killed_at)
    [row] = progress_rows(engine, topic)
    assert (row["to_position"], row["position"]) == (head, head)
    assert row["published"] == len(wanted)
    assert row["completed_at"] is not None
