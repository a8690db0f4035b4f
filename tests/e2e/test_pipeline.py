"""End to end over real HTTP, PostgreSQL and Kafka: a sales history posted to
the progression API comes out of the metrics API as the recorded decisions
say, for every metric.

The four services run as the commands a deployment runs (see support.py).
The expected figures are computed in the test from the progression feed and
the process files, not by the metrics service's code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.support import (
    check_every_metric,
    deals_from_feed,
    history,
    load_processes,
    overrides,
    pipeline,
)

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.timeout(240),
]

QUERIES = (
    {},
    {"group_by": "owner"},
    {"process": "inbound-fast-track"},
    {"process": "five-step"},
    {"process": "b2b-default", "group_by": "owner"},
    {"created_from": "2026-02-01", "created_to": "2026-04-30"},
)


def test_every_metric_matches_what_the_recorded_decisions_say(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    processes = load_processes()
    with pipeline(tmp_path, kafka_bootstrap) as running:
        running.start()
        running.post(history(300, seed=11))
        recorded = running.wait_caught_up()
        check_every_metric(running, recorded)

        # A person then moves some deals by hand: back to the start, a lost
        # deal reopened, deals won, lost or moved forward by override.
        corrections = overrides(deals_from_feed(recorded, processes), processes)
        assert len(corrections) == 14
        running.post(corrections)
        recorded = running.wait_caught_up()
        deals = check_every_metric(running, recorded, QUERIES)

        partitions = running.status()["partitions"]

    # The history reaches every case the metrics distinguish.
    created = [d for d in deals.values() if d.created is not None]
    assert len(created) == 300
    assert {d.process for d in created} == set(processes)
    assert {d.status for d in created} == {"open", "won", "lost", "disqualified"}
    outcomes = {v.outcome for d in created for v in d.visits}
    assert outcomes == {None, "advanced", "dropped", "moved_back"}
    assert {d.owner for d in created} >= {"ana", "ivan"}
    assert any(d.first_meeting is not None for d in created)
    assert any(d.no_show for d in created)
    assert any(d.other_changes for d in created)

    # Caught up, the projector status shows no lag on any partition.
    assert [p["partition"] for p in partitions] == [0, 1, 2]
    lags = [(p["end_offset"], p["lag"]) for p in partitions]
    assert lags == [(p["next_offset"], 0) for p in partitions], partitions
