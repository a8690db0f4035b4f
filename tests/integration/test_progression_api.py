"""The progression HTTP API, end to end over a real database."""

from __future__ import annotations

import pytest

from .progression_support import event, happy_path, progression_client


@pytest.fixture
def client(database_url: str):
    with progression_client(database_url) as client:
        yield client


def test_a_deal_walks_from_created_to_won_and_explains_each_step(client) -> None:
    stages = []
    for item in happy_path("acme-1"):
        response = client.post("/v1/events", json=item)
        assert response.status_code == 201, response.text
        stages += [d["data"]["to"] for d in response.json()["decisions"]]
        if stages and stages[-1] != "won":
            evaluation = client.get("/v1/deals/acme-1/evaluation").json()
            assert evaluation["stage"] == stages[-1]
            assert evaluation["missing"]
    assert stages == [
        "prospecting",
        "connecting",
        "researching",
        "presenting",
        "negotiating",
        "closing",
        "won",
    ]
    deal = client.get("/v1/deals/acme-1").json()
    assert deal["status"] == "won" and deal["stage"] is None
    assert (deal["owner"], deal["amount"], deal["currency"]) == ("rep-1", 12000, "EUR")
    assert deal["version"] == 14 + 7


def test_evaluation_names_what_is_missing(client) -> None:
    for item in happy_path("acme-2")[:3]:  # created, call, budget
        client.post("/v1/events", json=item)
    evaluation = client.get("/v1/deals/acme-2/evaluation").json()
    assert evaluation["stage"] == "connecting"
    assert evaluation["advances_on"] == {
        "action": "pain.shared",
        "seen": False,
        "event_id": None,
    }
    holds = {c["criterion"]: c["holds"] for c in evaluation["exit_criteria"]}
    assert holds == {
        "budget_confirmed": True,
        "authority_confirmed": False,
        "need_confirmed": False,
        "timeline_confirmed": False,
    }
    assert "pain.shared" in evaluation["missing"]
    assert "authority confirmed" in evaluation["missing"]


def test_the_same_event_again_answers_the_original_result(client) -> None:
    created, call = happy_path("acme-3")[:2]
    client.post("/v1/events", json=created)
    first = client.post("/v1/events", json=call)
    again = client.post("/v1/events", json=call)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json() == first.json()
    history = client.get("/v1/deals/acme-3/history").json()["events"]
    assert [e["event_id"] for e in history].count("acme-3-call") == 1


def test_the_same_event_id_with_other_content_is_a_conflict(client) -> None:
    created = happy_path("acme-4")[0]
    client.post("/v1/events", json=created)
    changed = dict(created, data={"owner": "someone-else"})
    response = client.post("/v1/events", json=changed)
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["errors"][0]["pointer"] == "/event_id"
    assert client.get("/v1/deals/acme-4").json()["owner"] == "rep-1"


def test_an_invalid_event_is_refused_naming_the_field_and_nothing_is_written(
    client,
) -> None:
    bad = event(
        "bad-1",
        "next_step.confirmed",
        "acme-5",
        1,
        date="2026-03-10",
        agenda="Demo",
        attendees=[],
    )
    response = client.post("/v1/events", json=bad)
    assert response.status_code == 422
    problem = response.json()
    assert problem["status"] == 422
    assert [e["pointer"] for e in problem["errors"]] == ["/data/attendees"]
    assert client.get("/v1/deals/acme-5").status_code == 404


def test_occurred_at_far_in_the_future_is_refused(client) -> None:
    item = event("future", "deal.created", "acme-6", 0, owner="r")
    item["occurred_at"] = "2999-01-01T00:00:00Z"
    response = client.post("/v1/events", json=item)
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/occurred_at"


def test_an_unknown_process_is_refused(client) -> None:
    item = event("c", "deal.created", "acme-7", 0, owner="r", process="no-such")
    response = client.post("/v1/events", json=item)
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/data/process"


def test_a_batch_reports_each_item_and_a_bad_item_stops_nothing(client) -> None:
    items = happy_path("acme-8")[:3]
    bad = event(
        "bad",
        "qualification.updated",
        "acme-8",
        5,
        criterion="mood",
        status="confirmed",
    )
    response = client.post(
        "/v1/events/batch", json={"events": [items[0], bad, items[1], items[1]]}
    )
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == [
        "created",
        "invalid",
        "created",
        "duplicate",
    ]
    assert results[1]["problem"]["errors"][0]["pointer"] == "/data/criterion"
    assert [d["data"]["to"] for d in results[2]["decisions"]] == ["connecting"]
    assert results[3]["event"]["position"] == results[2]["event"]["position"]
    again = client.post("/v1/events/batch", json={"events": [items[0]]}).json()
    assert again["results"][0]["status"] == "duplicate"


def test_a_batch_over_the_limit_is_refused(client) -> None:
    items = [event(f"e{i}", "email.sent", "acme-9", 1) for i in range(1001)]
    response = client.post("/v1/events/batch", json={"events": items})
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/events"


def test_events_before_creation_leave_the_deal_pending(client) -> None:
    items = happy_path("acme-10")
    for item in items[1:4]:
        assert client.post("/v1/events", json=item).json()["decisions"] == []
    assert client.get("/v1/deals/acme-10").json()["status"] == "pending"
    decisions = client.post("/v1/events", json=items[0]).json()["decisions"]
    assert [d["data"]["to"] for d in decisions] == ["prospecting", "connecting"]


def test_deals_are_listed_with_filters_and_a_cursor(client) -> None:
    for n in range(5):
        for item in happy_path(f"list-{n}", owner=f"rep-{n % 2}")[: 2 + n]:
            client.post("/v1/events", json=item)
    page = client.get("/v1/deals", params={"owner": "rep-0", "limit": 2}).json()
    assert [d["deal_id"] for d in page["deals"]] == ["list-0", "list-2"]
    rest = client.get(
        "/v1/deals", params={"owner": "rep-0", "cursor": page["next_cursor"]}
    ).json()
    assert [d["deal_id"] for d in rest["deals"]] == ["list-4"]
    assert rest["next_cursor"] is None
    connecting = client.get("/v1/deals", params={"stage": "connecting"}).json()
    # the BANT facts alone do not advance without the pain being shared
    assert [d["deal_id"] for d in connecting["deals"]] == [
        f"list-{n}" for n in range(5)
    ]
    bad = client.get("/v1/deals", params={"status": "sleeping"})
    assert bad.status_code == 422


def test_processes_are_listed_with_their_versions(client) -> None:
    listed = client.get("/v1/processes").json()["processes"]
    assert {p["key"] for p in listed} >= {"b2b-default", "inbound-fast-track"}
    default = client.get("/v1/processes/b2b-default").json()
    assert default["current_version"] == 1
    assert default["versions"][0]["current"] is True
    assert client.get("/v1/processes/nope").status_code == 404


def test_the_feed_pages_through_every_event_in_position_order(client) -> None:
    for item in happy_path("feed-1"):
        client.post("/v1/events", json=item)
    seen, after = [], 0
    while True:
        page = client.get("/v1/feed", params={"after": after, "limit": 5}).json()
        if not page["events"]:
            break
        seen += [e["position"] for e in page["events"]]
        after = page["next_after"]
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == 21


def test_health_and_readiness(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    assert client.get("/openapi.json").status_code == 200


def test_values_no_database_should_keep_are_refused_per_item(client) -> None:
    good = event("ok-1", "deal.created", "odd-1", 0, owner="r")
    impossible_day = dict(good, event_id="x-1", occurred_at="2026-02-30T09:00:00Z")
    out_of_range = dict(good, event_id="x-2", occurred_at="9999-12-31T23:59:59-01:00")
    nul = event("x-3", "deal.created", "odd-2", 0, owner="r\u0000")
    response = client.post(
        "/v1/events/batch", json={"events": [good, impossible_day, out_of_range, nul]}
    )
    results = response.json()["results"]
    assert [r["status"] for r in results] == [
        "created",
        "invalid",
        "invalid",
        "invalid",
    ]
    pointers = [r["problem"]["errors"][0]["pointer"] for r in results[1:]]
    assert pointers == ["/occurred_at", "/occurred_at", "/data/owner"]

    not_a_number = (
        b'{"event_id":"n1","type":"deal.created","deal_id":"odd-3",'
        b'"occurred_at":"2026-03-02T09:00:00Z","data":{"owner":"r","amount":NaN}}'
    )
    refused = client.post(
        "/v1/events",
        content=not_a_number,
        headers={"content-type": "application/json"},
    )
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["pointer"] == "/data/amount"
    assert client.get("/v1/deals/odd-3").status_code == 404


def test_the_same_number_written_differently_is_the_same_content(client) -> None:
    item = event("num-1", "deal.created", "num", 0, owner="r", amount=12000)
    assert client.post("/v1/events", json=item).status_code == 201
    again = dict(item, data={"owner": "r", "amount": 12000.0})
    assert client.post("/v1/events", json=again).status_code == 200
