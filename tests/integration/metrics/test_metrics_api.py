"""The metrics API over a projected read model, with every figure worked out
by hand from the deals described in scenario.py. Runs on SQLite and on
PostgreSQL; both must give these exact answers."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.integration.metrics.scenario import scenario
from tests.unit.metrics.conftest import Projected


@pytest.fixture
def api(client: TestClient, projected: Projected) -> TestClient:
    projected.apply(scenario(), batch=7)
    return client


def get(api: TestClient, path: str, **params: Any) -> Any:
    response = api.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def by_stage(answer: dict[str, Any]) -> dict[str, Any]:
    return {row["stage"]: row for row in answer["stages"]}


def test_the_funnel_counts_every_visit_of_each_stage(api: TestClient) -> None:
    answer = get(api, "/v1/metrics/funnel")
    assert answer["process"] == "b2b-default"
    assert [s["stage"] for s in answer["stages"]] == [
        "prospecting",
        "connecting",
        "researching",
        "presenting",
        "negotiating",
        "closing",
    ]
    stages = by_stage(answer)
    assert stages["prospecting"] == {
        "stage": "prospecting",
        "entered": 7,
        "advanced": 5,
        "dropped": 1,
        "dropped_by_reason": {"no_budget": 1},
        "moved_back": 0,
        "open": 1,
        "conversion": 5 / 7,
        "closed_conversion": 5 / 6,
    }
    assert stages["connecting"] == {
        "stage": "connecting",
        "entered": 5,
        "advanced": 2,
        "dropped": 1,
        "dropped_by_reason": {"price": 1},
        "moved_back": 1,
        "open": 1,
        "conversion": 2 / 5,
        "closed_conversion": 2 / 3,
    }
    assert stages["closing"]["entered"] == stages["closing"]["advanced"] == 2


def test_a_stage_nobody_entered_has_no_conversion(api: TestClient) -> None:
    answer = get(
        api, "/v1/metrics/funnel", created_from="2025-01-02", created_to="2025-01-02"
    )
    stages = by_stage(answer)  # only d2: lost in connecting
    assert stages["researching"]["entered"] == 0
    assert stages["researching"]["conversion"] is None
    assert stages["researching"]["closed_conversion"] is None
    assert stages["connecting"]["dropped_by_reason"] == {"price": 1}


def test_the_funnel_of_another_process_follows_its_own_stages(api: TestClient) -> None:
    answer = get(api, "/v1/metrics/funnel", process="fast-track")
    assert [
        (s["stage"], s["entered"], s["advanced"], s["dropped"])
        for s in answer["stages"]
    ] == [("qualify", 1, 1, 0), ("quote", 1, 0, 1)]


def test_velocity_is_days_in_stage_over_visits_that_advanced(api: TestClient) -> None:
    answer = get(api, "/v1/metrics/velocity", process="b2b-default")
    stages = by_stage(answer)
    # prospecting advanced after 2 (d1), 4 (d2), 1 and 2 (d4), 6 (d5) days
    assert stages["prospecting"] == {
        "stage": "prospecting",
        "count": 5,
        "mean_days": 3.0,
        "median_days": 2.0,
        "p90_days": pytest.approx(5.2),
    }
    # connecting: 3 (d1), 1 (d5); d2 was lost and d4 moved back: not counted
    assert stages["connecting"]["count"] == 2
    assert stages["connecting"]["mean_days"] == 2.0
    assert stages["connecting"]["p90_days"] == pytest.approx(2.8)
    # researching: 25 (d1), 9 (d5)
    assert stages["researching"]["median_days"] == 17.0
    assert stages["researching"]["p90_days"] == pytest.approx(23.4)
    assert stages["closing"] == {
        "stage": "closing",
        "count": 2,
        "mean_days": 0.0,
        "median_days": 0.0,
        "p90_days": 0.0,
    }
    assert answer["cycle_length"] == {
        "count": 2,
        "mean_days": 23.0,
        "median_days": 23.0,
    }
    # first meeting held: d1 after 1 day, d2 after 3
    assert answer["time_to_first_meeting"] == {
        "count": 2,
        "mean_days": 2.0,
        "median_days": 2.0,
    }


def test_outcomes_rates_and_process_adherence(api: TestClient) -> None:
    answer = get(api, "/v1/metrics/outcomes", process="b2b-default")
    assert answer == {
        "won": 2,
        "lost": 1,
        "disqualified": 1,
        "lost_by_reason": {"price": 1},
        "disqualified_by_reason": {"no_budget": 1},
        "win_rate": 2 / 3,
        "meetings_held": 2,
        "meetings_no_show": 2,
        "meeting_show_rate": 0.5,
        # criteria: d1 6, d2 1, d4 2, d5 6; others: d2 lost, d3 disq., d4 override
        "stage_changes": 18,
        "criteria_changes": 15,
        "process_adherence": 15 / 18,
        "groups": None,
    }
    everything = get(api, "/v1/metrics/outcomes")
    assert (everything["lost"], everything["win_rate"]) == (2, 0.5)


def test_pipeline_weighs_open_amounts_by_stage_probability(api: TestClient) -> None:
    answer = get(api, "/v1/metrics/pipeline", process="b2b-default")
    assert answer["open_deals"] == 2  # d4 (no amount) and d6
    assert answer["open_amount"] == 10000.0
    assert answer["weighted_pipeline"] == pytest.approx(500.0)  # 10000 x 0.05
    assert answer["deals_without_amount"] == 1
    assert answer["currencies"] == ["EUR"]
    assert answer["mean_won_amount"] == 2000.0
    assert answer["mean_cycle_days"] == 23.0
    # 2 open x 2/3 win rate x 2000 mean won amount / 23 days
    assert answer["pipeline_velocity"] == pytest.approx(2 * (2 / 3) * 2000 / 23)


def test_the_currency_filter_keeps_one_currency(api: TestClient) -> None:
    answer = get(api, "/v1/metrics/outcomes", currency="USD")
    assert (answer["won"], answer["disqualified"]) == (0, 1)


def test_stalled_deals_are_listed_oldest_first(api: TestClient) -> None:
    answer = get(api, "/v1/metrics/stalled", as_of="2025-01-21T00:00:00Z")
    assert answer["as_of"] == "2025-01-21T00:00:00Z"
    assert answer["count"] == 2
    assert answer["deals"] == [
        {
            "deal_id": "d6",
            "owner": "ana",
            "process": "b2b-default",
            "stage": "prospecting",
            "stage_entered_at": "2025-01-06T00:00:00Z",
            "age_days": 15.0,
            "expected_days": 3.0,
        },
        {
            "deal_id": "d4",
            "owner": "bo",
            "process": "b2b-default",
            "stage": "connecting",
            "stage_entered_at": "2025-01-09T00:00:00Z",
            "age_days": 12.0,
            "expected_days": 7.0,
        },
    ]
    limited = get(api, "/v1/metrics/stalled", as_of="2025-01-21T00:00:00Z", limit=1)
    assert (limited["count"], [d["deal_id"] for d in limited["deals"]]) == (2, ["d6"])
    # d6 entered prospecting on day 5: exactly 3 days later it is not stalled yet
    exactly = get(api, "/v1/metrics/stalled", as_of="2025-01-09T00:00:00Z")
    assert exactly["deals"] == []
    later = get(api, "/v1/metrics/stalled", as_of="2025-01-09T00:00:01Z")
    assert [d["deal_id"] for d in later["deals"]] == ["d6"]


def test_grouping_by_owner_shows_each_rep_and_the_overall_figures(
    api: TestClient,
) -> None:
    answer = get(api, "/v1/metrics/outcomes", process="b2b-default", group_by="owner")
    assert answer["win_rate"] == 2 / 3
    groups = {g["owner"]: g for g in answer["groups"]}
    assert set(groups) == {"ana", "bo"}
    assert (groups["ana"]["won"], groups["ana"]["lost"], groups["ana"]["win_rate"]) == (
        1,
        1,
        0.5,
    )
    assert (
        groups["bo"]["won"],
        groups["bo"]["disqualified"],
        groups["bo"]["win_rate"],
    ) == (1, 1, 1.0)

    velocity = get(api, "/v1/metrics/velocity", process="b2b-default", group_by="owner")
    ana = {g["owner"]: g for g in velocity["groups"]}["ana"]
    assert ana["cycle_length"] == {"count": 1, "mean_days": 30.0, "median_days": 30.0}
    assert by_stage(ana)["prospecting"]["count"] == 2  # d1 and d2

    funnel = get(api, "/v1/metrics/funnel", group_by="owner")
    bo = {g["owner"]: g for g in funnel["groups"]}["bo"]
    assert by_stage(bo)["connecting"]["moved_back"] == 1

    stalled = get(api, "/v1/metrics/stalled", as_of="2025-01-21", group_by="owner")
    assert [(g["owner"], g["count"]) for g in stalled["groups"]] == [
        ("ana", 1),
        ("bo", 1),
    ]


def test_created_filters_take_dates_and_timestamps(api: TestClient) -> None:
    since = get(
        api, "/v1/metrics/pipeline", process="b2b-default", created_from="2025-01-03"
    )
    assert since["open_deals"] == 2 and since["win_rate"] == 1.0  # d3..d6
    until = get(api, "/v1/metrics/outcomes", created_to="2025-01-02T00:00:00Z")
    assert (until["won"], until["lost"]) == (1, 1)  # d1 and d7 only


def test_a_bad_parameter_is_a_problem_naming_it(api: TestClient) -> None:
    response = api.get("/v1/metrics/stalled", params={"as_of": "yesterday", "limit": 0})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 400 and problem["title"]
    assert {e["name"] for e in problem["errors"]} == {"limit"}
    response = api.get("/v1/metrics/outcomes", params={"created_from": "2025-13-01"})
    assert [e["name"] for e in response.json()["errors"]] == ["created_from"]
    response = api.get(
        "/v1/metrics/outcomes", params={"created_from": "2025-01-01T00:00:00"}
    )
    assert "offset" in response.json()["errors"][0]["detail"]


def test_an_unknown_process_is_not_found(api: TestClient) -> None:
    response = api.get("/v1/metrics/funnel", params={"process": "nope"})
    assert response.status_code == 404
    assert response.json()["type"].endswith("unknown-process")


def test_projector_status_and_parked_events(
    api: TestClient, projected: Projected
) -> None:
    projected.apply(
        [{"event_id": "bad", "type": "deal.created", "deal_id": "zz", "position": 999}]
    )
    status = get(api, "/v1/projector/status")
    assert status["source"] == "feed"
    assert status["feed_url"] == "http://feed.test"
    assert status["last_position"] == 999
    assert status["events_applied"] == len(scenario())
    assert status["parked"] == 1
    parked = get(api, "/v1/parked")
    assert parked["count"] == 1
    assert parked["events"][0]["event_id"] == "bad"
    assert "occurred_at" in parked["events"][0]["error"]


def test_health_readiness_and_openapi(api: TestClient) -> None:
    assert get(api, "/healthz") == {"status": "ok"}
    assert get(api, "/readyz") == {"status": "ready"}
    paths = get(api, "/openapi.json")["paths"]
    assert "/v1/metrics/funnel" in paths and "/v1/parked" in paths
