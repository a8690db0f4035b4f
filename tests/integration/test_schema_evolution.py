"""An old event version reads as the current one; nothing stored is rewritten."""

from __future__ import annotations

from typing import Any

import pytest

from progression.upcasting import upcast

from .progression_support import happy_path, progression_client


def test_version_1_attendees_become_people() -> None:
    v1 = {
        "date": "2026-03-10",
        "agenda": "Demo",
        "attendees": ["cfo@acme.example", "Dana from IT"],
    }
    assert upcast("next_step.confirmed", 1, v1)["attendees"] == [
        {"email": "cfo@acme.example"},
        {"name": "Dana from IT"},
    ]
    v2 = {"date": "2026-03-10", "agenda": "Demo", "attendees": [{"name": "Dana"}]}
    assert upcast("next_step.confirmed", 2, v2) == v2
    assert upcast("value.agreed", 1, {}) == {}


def as_version_2(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        if item["type"] == "next_step.confirmed":
            people = [{"email": a} for a in item["data"]["attendees"]]
            item = {
                **item,
                "schema_version": 2,
                "data": {**item["data"], "attendees": people},
            }
        out.append(item)
    return out


def decisions(client, deal_id: str) -> list[dict[str, Any]]:
    history = client.get(f"/v1/deals/{deal_id}/history").json()["events"]
    keep = ("from", "to", "cause", "effective_at", "process", "process_version")
    return [
        {k: e["data"][k] for k in keep} for e in history if e["type"] == "stage.changed"
    ]


@pytest.fixture
def client(database_url: str):
    with progression_client(database_url) as client:
        yield client


def test_a_history_written_with_version_1_decides_as_version_2(client) -> None:
    old = happy_path("old-1")
    new = as_version_2(happy_path("new-1"))
    for item in old + new:
        assert client.post("/v1/events", json=item).status_code == 201
    assert decisions(client, "old-1") == decisions(client, "new-1")
    assert len(decisions(client, "old-1")) == 7

    old_deal = client.get("/v1/deals/old-1").json()["facts"]["next_step"]
    new_deal = client.get("/v1/deals/new-1").json()["facts"]["next_step"]
    assert (
        old_deal["attendees"]
        == new_deal["attendees"]
        == [{"email": "cfo@prospect.example"}]
    )
    # The stored event keeps the shape and version it was written with.
    stored = [
        e
        for e in client.get("/v1/deals/old-1/history").json()["events"]
        if e["type"] == "next_step.confirmed"
    ]
    assert stored[0]["schema_version"] == 1
    assert stored[0]["data"]["attendees"] == ["cfo@prospect.example"]


def test_each_version_is_checked_against_its_own_schema(client) -> None:
    [created, *_] = happy_path("v-1")
    client.post("/v1/events", json=created)
    step = next(i for i in happy_path("v-1") if i["type"] == "next_step.confirmed")
    objects_as_v1 = {
        **step,
        "event_id": "a",
        "data": {**step["data"], "attendees": [{"email": "x@y.example"}]},
    }
    strings_as_v2 = {**step, "event_id": "b", "schema_version": 2}
    unknown = {**step, "event_id": "c", "schema_version": 3}
    for item, pointer in (
        (objects_as_v1, "/data/attendees/0"),
        (strings_as_v2, "/data/attendees/0"),
        (unknown, "/schema_version"),
    ):
        response = client.post("/v1/events", json=item)
        assert response.status_code == 422, item
        assert response.json()["errors"][0]["pointer"] == pointer
