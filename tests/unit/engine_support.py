"""Helpers that drive the decision engine the way the service does."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from progression.decision import Decision, StreamEvent, decide, process_ref
from progression.process import Process, ProcessCatalog, load_process_dir

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def catalog() -> ProcessCatalog:
    schema = json.loads((SCHEMAS / "process.schema.json").read_text())
    return ProcessCatalog(load_process_dir(SCHEMAS / "processes", schema))


CATALOG = catalog()
DEFAULT = CATALOG.current("b2b-default")


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


@dataclass(frozen=True)
class Input:
    event_id: str
    type: str
    occurred_at: datetime
    data: dict[str, Any] = field(default_factory=dict)


def ev(event_id: str, type_: str, hours: float, **data: Any) -> Input:
    return Input(event_id, type_, at(hours), data)


@dataclass
class Deal:
    """A deal stream fed one input at a time, decisions appended as they come."""

    catalog: ProcessCatalog = CATALOG
    stream: list[StreamEvent] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def post(self, item: Input) -> list[Decision]:
        self.stream.append(
            StreamEvent(
                item.event_id,
                item.type,
                item.occurred_at,
                item.data,
                len(self.stream) + 1,
            )
        )
        process = self.process
        if process is None:
            return []
        made = decide(self.stream, process)
        for decision in made:
            self.stream.append(
                StreamEvent(
                    f"decision-{len(self.stream) + 1}",
                    "stage.changed",
                    decision.effective_at,
                    decision.data(),
                    len(self.stream) + 1,
                )
            )
        self.decisions.extend(made)
        return made

    def post_all(self, items: Iterable[Input]) -> Deal:
        for item in items:
            self.post(item)
        return self

    @property
    def process(self) -> Process | None:
        ref = process_ref(self.stream)
        if ref is None:
            return None
        key, version = ref
        return (
            self.catalog.current(key)
            if version is None
            else self.catalog.get(key, version)
        )

    @property
    def path(self) -> list[str]:
        return [d.to for d in self.decisions]

    @property
    def where(self) -> str | None:
        return self.decisions[-1].to if self.decisions else None


def bant(hours: float, prefix: str = "q", **statuses: str) -> list[Input]:
    return [
        ev(
            f"{prefix}-{criterion}",
            "qualification.updated",
            hours,
            criterion=criterion,
            status=status,
        )
        for criterion, status in statuses.items()
    ]


def happy_path(deal_id: str = "d") -> list[Input]:
    """Every input b2b-default needs from creation to won, once each."""
    return [
        ev(f"{deal_id}-created", "deal.created", 0, owner="rep-1", amount=12000),
        ev(f"{deal_id}-call", "discovery_call.agreed", 10),
        *bant(
            20,
            prefix=f"{deal_id}-q",
            budget="confirmed",
            authority="confirmed",
            need="confirmed",
            timeline="confirmed",
        ),
        ev(f"{deal_id}-pain", "pain.shared", 30),
        ev(
            f"{deal_id}-next",
            "next_step.confirmed",
            40,
            date="2026-03-10",
            agenda="Demo",
            attendees=["cfo@prospect.example"],
        ),
        ev(f"{deal_id}-invite", "stakeholder.invited", 50),
        ev(f"{deal_id}-value", "value.agreed", 60),
        ev(f"{deal_id}-proposal", "proposal.requested", 70),
        ev(f"{deal_id}-mapped", "decision_process.mapped", 80),
        ev(f"{deal_id}-procurement", "procurement.introduced", 90),
        ev(f"{deal_id}-signed", "contract.signed", 100),
    ]


def effective(decisions: Sequence[Decision]) -> list[tuple[str | None, str, datetime]]:
    return [(d.from_stage, d.to, d.effective_at) for d in decisions]
