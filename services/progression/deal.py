"""A deal as a rep sees it: its status, stage, owner, amount and facts.

Folded from the deal's stream; the lead score uses the weights of the
process the deal is decided by.
"""

from __future__ import annotations

__all__ = ["DealView", "view_of"]

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .criteria import BANT, DealFacts
from .decision import STAGE_CHANGED, StreamEvent, position_of
from .process import Process

COUNTED = (
    "discovery_call.agreed",
    "pain.shared",
    "stakeholder.invited",
    "proposal.requested",
    "procurement.introduced",
    "contract.signed",
    "next_step.confirmed",
    "value.agreed",
    "decision_process.mapped",
    "disqualifier.identified",
    "meeting.booked",
    "meeting.held",
    "meeting.no_show",
)


@dataclass(frozen=True, slots=True)
class DealView:
    deal_id: str
    status: str
    stage: str | None
    stage_entered_at: datetime | None
    process: str | None
    process_version: int | None
    owner: str | None
    amount: float | None
    currency: str | None
    name: str | None
    lead_score: int | None
    facts: dict[str, Any]
    created_at: datetime | None
    version: int


def view_of(
    deal_id: str, stream: Sequence[StreamEvent], process: Process | None
) -> DealView:
    position = position_of(stream)
    inputs = [e for e in stream if e.type != STAGE_CHANGED]

    # Owner, amount, currency and name: the latest value by occurrence.
    details: dict[str, tuple[tuple[datetime, int], Any]] = {}
    for event in inputs:
        if event.type not in ("deal.created", "deal.updated"):
            continue
        if event.type == "deal.created" and event is not position.created:
            continue  # a second deal.created is kept and changes nothing
        for field in ("owner", "amount", "currency", "name"):
            if field in event.data:
                order = (event.occurred_at, event.arrival)
                if field not in details or order > details[field][0]:
                    details[field] = (order, event.data[field])

    facts = DealFacts.of(e.as_fact() for e in inputs)
    qualification = {
        criterion: (
            {
                "status": fact.data.get("status"),
                "path": fact.data.get("path"),
                "event_id": fact.event_id,
                "occurred_at": fact.occurred_at.isoformat().replace("+00:00", "Z"),
            }
            if (fact := facts.qualification.get(criterion))
            else None
        )
        for criterion in BANT
    }
    counts = {t: len(facts.of_type(t)) for t in COUNTED if facts.of_type(t)}
    next_steps = facts.of_type("next_step.confirmed")
    next_step = (
        {
            "date": next_steps[-1].data.get("date"),
            "agenda": next_steps[-1].data.get("agenda"),
            "attendees": next_steps[-1].data.get("attendees"),
            "event_id": next_steps[-1].event_id,
        }
        if next_steps
        else None
    )
    score = facts.lead_score(process.lead_score)[0] if process else None

    amount = details.get("amount", (None, None))[1]
    return DealView(
        deal_id=deal_id,
        status=position.status,
        stage=position.stage,
        stage_entered_at=position.entered_at,
        process=position.process,
        process_version=position.process_version,
        owner=details.get("owner", (None, None))[1],
        amount=None if amount is None else float(amount),
        currency=details.get("currency", (None, None))[1],
        name=details.get("name", (None, None))[1],
        lead_score=score,
        facts={
            "qualification": qualification,
            "next_step": next_step,
            "events": counts,
        },
        created_at=position.created.occurred_at if position.created else None,
        version=stream[-1].arrival if stream else 0,
    )
