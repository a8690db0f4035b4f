"""Building a progression service over a test database, and events to post."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient

from progression.api import create_app
from progression.service import Service
from progression.settings import load_settings

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def at(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")


def event(event_id: str, type_: str, deal_id: str, hours: float, **data: Any) -> dict:
    return {
        "event_id": event_id,
        "type": type_,
        "deal_id": deal_id,
        "occurred_at": at(hours),
        "source": "crm",
        "data": data,
    }


def happy_path(deal_id: str, owner: str = "rep-1") -> list[dict[str, Any]]:
    """Every input b2b-default needs from creation to won, in order."""
    d = deal_id
    return [
        event(
            f"{d}-created",
            "deal.created",
            d,
            0,
            owner=owner,
            amount=12000,
            currency="EUR",
        ),
        event(f"{d}-call", "discovery_call.agreed", d, 10),
        *[
            event(
                f"{d}-{c}",
                "qualification.updated",
                d,
                20,
                criterion=c,
                status="confirmed",
            )
            for c in ("budget", "authority", "need", "timeline")
        ],
        event(f"{d}-pain", "pain.shared", d, 30),
        event(
            f"{d}-next",
            "next_step.confirmed",
            d,
            40,
            date="2026-03-10",
            agenda="Demo",
            attendees=["cfo@prospect.example"],
        ),
        event(f"{d}-invite", "stakeholder.invited", d, 50),
        event(f"{d}-value", "value.agreed", d, 60),
        event(f"{d}-proposal", "proposal.requested", d, 70),
        event(f"{d}-mapped", "decision_process.mapped", d, 80),
        event(f"{d}-procurement", "procurement.introduced", d, 90),
        event(f"{d}-signed", "contract.signed", d, 100),
    ]


@contextmanager
def progression_client(database_url: str, **settings: Any) -> Iterator[TestClient]:
    """A client wired to a freshly started service on that database."""
    service = Service.start(load_settings(database_url=database_url, **settings))
    try:
        with TestClient(
            create_app(service), base_url="http://127.0.0.1:8000"
        ) as client:
            client.service = service  # type: ignore[attr-defined]
            yield client
    finally:
        service.engine.dispose()
