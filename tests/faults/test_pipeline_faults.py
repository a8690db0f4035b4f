"""The whole pipeline under faults: processes killed mid-stream, the broker
stopped while events keep arriving, a projector of a group lost, writers
posting at once.

Each test ends with the comparison of tests/e2e/test_pipeline.py: every
metric of the metrics API equals the figure computed in the test from the
recorded decisions, which is what a run without the fault gives (that test
checks it), and the projector has applied exactly as many events as the
log holds, none parked. So nothing was lost and nothing counted twice.

How a kill is made to land mid-stream: the killed process runs with small
batches, so that it commits its progress often, and has a long stream ahead
(the history is in the log or on the topic before it starts, or is still
being posted); the test polls that progress (the relay's recorded position,
the events applied in the projector status), kills once part of the stream
is through, and checks from what the killed process had stored that it was
stopped short of the end. Each test says how.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.support import (
    CATCH_UP_S,
    START_S,
    Pipeline,
    Service,
    check_every_metric,
    history,
    pipeline,
    post_concurrently,
    posting_in_background,
    wait_for,
)
from tests.faults.test_relay_faults import Broker

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.timeout(240),
]

DEALS = 600  # about 11,000 recorded events
MORE_DEALS = 100  # posted while a killed process is down
SMALL_BATCH = 20  # events per batch of the process a test kills
NORMAL_BATCH = 1000  # and of the one that replaces it
WRITTEN_DEALS = 300  # posted by the concurrent writers, 50 events a batch
OUTAGE_S = 3  # how long events keep arriving with the broker stopped
SESSION_TIMEOUT_MS = 8_000  # of the two projectors of one group
HAND_OVER_S = 30  # the longest the group may take to notice a killed one


def events(seed: int) -> tuple[list[dict], list[dict]]:
    """A history of DEALS deals, and the next MORE_DEALS deals of it."""
    everything = history(DEALS + MORE_DEALS, seed)
    first = history(DEALS, seed)
    assert everything[: len(first)] == first
    return first, everything[len(first) :]


def kill_once(
    service: Service, progress: Callable[[], int], at_least: int, running: Pipeline
) -> int:
    """SIGKILL `service` once `progress` has reached `at_least`; returns the
    progress stored when it died."""
    wait_for(
        lambda: progress() >= at_least,
        f"{service.name} to get to {at_least}",
        CATCH_UP_S,
        running.running(),
    )
    service.kill()
    return progress()


def assigned_partitions(service: Service) -> set[int]:
    """The partitions a projector holds, from its log: those assigned since
    it last had partitions revoked."""
    held: set[int] = set()
    for line in service.log().splitlines():
        if "partitions revoked" in line:
            held.clear()
        found = re.search(r"partition assigned .*partition=(\d+)", line)
        if found:
            held.add(int(found.group(1)))
    return held


@pytest.fixture
def broker(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Broker]:
    """A broker of this test's own, which it may stop and start again."""
    # kafka_bootstrap applies the rule of every broker test: without the
    # local services (which fetched Kafka's jars), fail in CI, skip elsewhere.
    del kafka_bootstrap
    own = Broker(tmp_path / "broker")
    own.start()
    yield own
    own.remove()


def test_a_projector_killed_mid_stream_and_restarted_counts_every_event_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    first, more = events(seed=21)
    with pipeline(
        tmp_path, kafka_bootstrap, projector_batch_size=SMALL_BATCH
    ) as running:
        running.start(projector=False)
        running.post(first)
        head = running.head()
        wait_for(
            lambda: running.relay_position() == head,
            "the relay to publish the history",
            CATCH_UP_S,
            running.running(),
        )
        total = len(running.feed())

        # Mid-stream: the whole history is on the topic before the projector
        # starts; it is killed once a fifth is applied, and the status (read
        # from what the projector had committed) shows it short of the end.
        projector = running.start_projector()
        killed_at = kill_once(projector, running.applied, total // 5, running)
        assert 0 < killed_at < total, "the projector was not killed mid-stream"

        running.post(more)  # events keep arriving while no projector runs
        running.projector_batch_size = NORMAL_BATCH
        again = running.start_projector("projector-again")
        recorded = running.wait_caught_up()
        check_every_metric(running, recorded)

    # The restarted projector went on from the offsets stored with the read
    # models, not from the beginning.
    assert re.search(r"partition assigned .*offset=\d+", again.log())


def test_a_relay_killed_mid_publish_and_restarted_loses_and_doubles_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    first, more = events(seed=22)
    with pipeline(tmp_path, kafka_bootstrap, relay_batch_size=SMALL_BATCH) as running:
        running.start(relay=False)
        running.post(first)
        head = running.head()

        # Mid-publish: the whole history is in the log before the relay
        # starts; it is killed once its recorded position (relay_progress)
        # passes a fifth of the log, and that position is short of the head.
        # The batches it had in flight are sent again by the next relay.
        relay = running.start_relay()
        killed_at = kill_once(relay, running.relay_position, head // 5, running)
        assert 0 < killed_at < head, "the relay was not killed mid-publish"

        running.post(more)  # events keep arriving while no relay runs
        running.relay_batch_size = NORMAL_BATCH
        running.start_relay("relay-again")
        recorded = running.wait_caught_up()
        check_every_metric(running, recorded)


def test_the_pipeline_catches_up_after_the_broker_is_stopped_and_started(
    broker: Broker, tmp_path: Path
) -> None:
    everything = history(DEALS, seed=23)
    before, during, after = everything[:3000], everything[3000:8000], everything[8000:]
    with pipeline(tmp_path, broker.bootstrap) as running:
        running.start()
        running.post(before)
        wait_for(
            lambda: running.applied() > 0,
            "the first events",
            CATCH_UP_S,
            running.running(),
        )

        broker.stop()
        # The progression API goes on accepting events: they wait in the log,
        # and the relay's recorded position stays behind the head.
        started = time.monotonic()
        for start in range(0, len(during), 250):
            running.post(during[start : start + 250])
            time.sleep(OUTAGE_S / (len(during) / 250))
        assert time.monotonic() - started >= OUTAGE_S
        assert running.relay_position() < running.head(), "nothing was held up"

        broker.start_again()
        running.post(after)
        recorded = running.wait_caught_up(timeout_s=CATCH_UP_S + START_S)
        check_every_metric(running, recorded)


def test_a_projector_of_a_group_killed_while_consuming_is_replaced_by_the_other(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    first, _ = events(seed=24)
    with pipeline(
        tmp_path,
        kafka_bootstrap,
        projector_batch_size=SMALL_BATCH,
        projector_session_timeout_ms=SESSION_TIMEOUT_MS,
    ) as running:
        running.start(projector=False)
        doomed = running.start_projector("projector-1")
        survivor = running.start_projector("projector-2")
        every = set(range(running.partitions))

        def split() -> bool:
            mine, theirs = assigned_partitions(doomed), assigned_partitions(survivor)
            return (
                bool(mine and theirs) and not mine & theirs and mine | theirs == every
            )

        wait_for(split, "the group to split the partitions", START_S, running.running())
        held = assigned_partitions(doomed)

        # While consuming: the history (thousands of events) is still being
        # posted when the projectors have applied 2,000 events and one is
        # killed; it had applied events of its own partitions, and fewer
        # events than the log ends up with were applied in all.
        with posting_in_background(running, first):
            applied_at_kill = kill_once(doomed, running.applied, 2000, running)
            consumed = running.status()["partitions"]
            # The group notices within the session timeout the projectors
            # were given (kafka-python's default of 45 s would not do).
            wait_for(
                lambda: assigned_partitions(survivor) == every,
                "the survivor to take the killed projector's partitions",
                HAND_OVER_S,
                running.running(),
            )
        assert any(p["events_applied"] for p in consumed if p["partition"] in held)

        recorded = running.wait_caught_up()
        check_every_metric(running, recorded)
        # The other projector took the killed one's partitions over.
        assert assigned_partitions(survivor) == every

    assert applied_at_kill < len(recorded), "the projector was not killed mid-stream"


def test_concurrent_writers_while_the_relay_runs_lose_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    with pipeline(tmp_path, kafka_bootstrap) as running:
        running.start()
        post_concurrently(running, history(WRITTEN_DEALS, seed=25), writers=4)
        recorded = running.wait_caught_up()
        check_every_metric(running, recorded)
