"""The parked events over the API: one of them, retries, and the ops scope
they need (on SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from metrics.api import create_app
from metrics.settings import Settings
from tests.unit.metrics.conftest import Projected
from tests.unit.metrics.parking import deploy_stage_changed_v2, held_stream

API = "api-token-0123456789"
OPS = "ops-token-0123456789"


@pytest.fixture
def held(projected: Projected) -> Projected:
    """d1's events parked: 1, its version-2 stage change, and 2 to 7 behind."""
    projected.apply(held_stream()[0])
    return projected


@contextmanager
def api(
    settings: Settings, projected: Projected, **tokens: str
) -> Iterator[TestClient]:
    configured = settings.model_copy(
        update={name: SecretStr(value) for name, value in tokens.items()}
    )
    with TestClient(create_app(configured, projected.catalog)) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def problem(response: Any, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"]
    assert body["type"] == f"urn:dealledger:metrics:problem:{kind}"
    return body


def test_one_parked_event_and_what_holds_it_back(
    settings: Settings, held: Projected
) -> None:
    with api(settings, held) as client:
        first = client.get("/v1/parked/1").json()
        second = client.get("/v1/parked/2")
        unknown = client.get("/v1/parked/99")

    assert (first["type"], first["stream_version"], first["held_behind"]) == (
        "stage.changed",
        3,
        None,
    )
    assert "newer than this projector knows" in first["error"]
    assert second.status_code == 200
    assert (second.json()["held_behind"], second.json()["type"]) == (1, "meeting.held")
    assert problem(unknown, 404, "unknown-parked-event")["detail"] == (
        "no parked event with id=99"
    )


def test_retries_answer_what_happened_to_each_event(
    settings: Settings, held: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    with api(settings, held) as client:  # no token: loopback, all allowed
        refused = client.post("/v1/parked/2/retry")
        failed = client.post("/v1/parked/1/retry")
        deploy_stage_changed_v2(monkeypatch)
        lost_before = client.get("/v1/metrics/outcomes").json()["lost"]
        first = client.post("/v1/parked/1/retry")
        rest = client.post("/v1/parked/retry", json={"all": True, "deal": "d1"})
        again = client.post("/v1/parked/1/retry")
        lost_after = client.get("/v1/metrics/outcomes").json()["lost"]
        parked = client.get("/v1/parked").json()

    held_problem = problem(refused, 409, "parked-event-held")
    assert "held behind parked event id=1 " in held_problem["detail"]
    assert failed.status_code == 200
    assert [(e["id"], e["outcome"]) for e in failed.json()["events"]] == [(1, "parked")]
    assert "newer than this projector knows" in failed.json()["events"][0]["error"]
    assert first.json()["applied"] == 1
    assert rest.status_code == 200
    assert [(e["id"], e["outcome"]) for e in rest.json()["events"]] == [
        (i, "applied") for i in range(2, 8)
    ]
    problem(again, 404, "unknown-parked-event")
    assert (lost_before, lost_after) == (0, 1)  # d1's loss was held
    assert parked["count"] == 0


def test_retrying_every_event_must_say_all(settings: Settings, held: Projected) -> None:
    with api(settings, held) as client:
        unsaid = client.post("/v1/parked/retry")
        other_deal = client.post(
            "/v1/parked/retry", params={"all": "true", "deal": "d9"}
        )

    assert [
        e["name"] for e in problem(unsaid, 400, "invalid-parameters")["errors"]
    ] == ["all"]
    assert other_deal.status_code == 200
    assert other_deal.json() == {
        "applied": 0,
        "parked": 0,
        "held": 0,
        "missing": 0,
        "events": [],
    }
    assert held.rows("SELECT count(*) FROM parked_events") == [(7,)]


def test_with_an_api_token_and_no_ops_token_retries_are_forbidden(
    settings: Settings, held: Projected
) -> None:
    with api(settings, held, api_token=API) as client:
        assert client.get("/v1/parked/1", headers=bearer(API)).status_code == 200
        anonymous = client.post("/v1/parked/1/retry")
        reader = client.post("/v1/parked/1/retry", headers=bearer(API))
        everything = client.post(
            "/v1/parked/retry", json={"all": True}, headers=bearer(API)
        )

    assert anonymous.status_code == 401
    for refused in (reader, everything):
        body = problem(refused, 403, "ops-token-not-configured")
        assert "METRICS_OPS_TOKEN is not configured" in body["detail"]
    assert held.rows("SELECT count(*) FROM parked_events") == [(7,)]


def test_the_ops_token_retries_and_reads_the_api_token_only_reads(
    settings: Settings, held: Projected
) -> None:
    with api(settings, held, api_token=API, ops_token=OPS) as client:
        reads = [
            client.get("/v1/parked", headers=bearer(token)).status_code
            for token in (API, OPS)
        ]
        assert client.get("/v1/metrics/outcomes", headers=bearer(OPS)).is_success
        reader = client.post("/v1/parked/1/retry", headers=bearer(API))
        anonymous = client.post("/v1/parked/1/retry")
        wrong = client.post("/v1/parked/1/retry", headers=bearer("not-a-token"))
        operator = client.post("/v1/parked/1/retry", headers=bearer(OPS))

    assert reads == [200, 200]
    assert "ops token" in problem(reader, 403, "ops-scope-required")["detail"]
    assert anonymous.status_code == wrong.status_code == 401
    assert operator.status_code == 200
    assert operator.json()["events"][0]["outcome"] == "parked"  # no fix deployed


def test_an_ops_token_alone_guards_the_retries_and_leaves_reads_open(
    settings: Settings, held: Projected
) -> None:
    with api(settings, held, ops_token=OPS) as client:
        read = client.get("/v1/parked/1")
        anonymous = client.post("/v1/parked/1/retry")
        operator = client.post("/v1/parked/1/retry", headers=bearer(OPS))

    assert read.status_code == 200
    problem(anonymous, 401, "ops-token-required")
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert operator.status_code == 200
