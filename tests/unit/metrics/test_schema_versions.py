"""The projection reads every schema version in today's shape."""

from __future__ import annotations

from metrics.upcasting import upcast
from tests.unit.metrics.conftest import Projected
from tests.unit.metrics.streams import Log


def test_next_step_version_1_reads_as_version_2() -> None:
    v1 = {"date": "2026-03-10", "agenda": "Demo", "attendees": ["a@b.example", "Dana"]}
    assert upcast("next_step.confirmed", 1, v1)["attendees"] == [
        {"email": "a@b.example"},
        {"name": "Dana"},
    ]


def history(version: int) -> list[dict[str, object]]:
    log = Log()
    log.create("d1", 0)
    attendees: list[object] = (
        ["cfo@acme.example"] if version == 1 else [{"email": "cfo@acme.example"}]
    )
    step = log.add(
        "d1",
        "next_step.confirmed",
        1,
        {"date": "2026-03-10", "agenda": "Demo", "attendees": attendees},
    )
    step["schema_version"] = version
    log.advance_to("d1", "presenting", 2)
    log.meeting("d1", 3)
    return log.events


def test_a_history_of_either_version_projects_the_same(projected: Projected) -> None:
    result = projected.apply(history(1))
    assert result.parked == 0
    first = projected.rows(
        "SELECT stage, entered_us, left_us, outcome FROM stage_visits ORDER BY seq"
    )
    assert [row[0] for row in first][:3] == ["prospecting", "connecting", "researching"]
    renamed = [
        {**e, "deal_id": "d2", "event_id": "v2-" + str(e["event_id"])}
        for e in history(2)
    ]
    for event, position in zip(renamed, range(100, 200), strict=False):
        event["position"] = position
    assert projected.apply(renamed).parked == 0
    second = projected.rows(
        "SELECT stage, entered_us, left_us, outcome FROM stage_visits "
        "WHERE deal_id = 'd2' ORDER BY seq"
    )
    assert second == projected.rows(
        "SELECT stage, entered_us, left_us, outcome FROM stage_visits "
        "WHERE deal_id = 'd1' ORDER BY seq"
    )


def test_a_version_newer_than_the_projector_knows_is_parked(
    projected: Projected,
) -> None:
    log = Log()
    log.create("d1", 0)
    future = log.add("d1", "next_step.confirmed", 1, {"date": "2026-03-10"})
    future["schema_version"] = 3
    log.meeting("d1", 2)
    result = projected.apply(log.events)
    # 2: the meeting after it is held behind it (it used to be applied).
    assert result.parked == 2
    error = projected.rows("SELECT error FROM parked_events ORDER BY id")[0][0]
    assert "schema_version 3 of next_step.confirmed" in error
