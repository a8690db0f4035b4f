"""Deal histories for the benchmarks: seeded, realistic, interleaved like a CRM.

Every deal follows the b2b-default process for as far as it gets: created,
a discovery call, the four BANT facts, the pain, a dated next step, an
invitation, the value, a proposal, the decision process, procurement and,
for the deals that are won, the signed contract. Engagement signals
(emails, meetings, clicks, downloads) and an occasional change of amount
fill each history up to the same length. Some deals stall in a stage, a
few are lost or disqualified.

All deals of one run are spread over the same stretch of the past, so that
many are active at once; the events of all deals are then put in the order
they happened, which keeps each deal's own events in order. The same seed
gives the same events, byte for byte.
"""

from __future__ import annotations

__all__ = [
    "ENGAGEMENT",
    "EPOCH",
    "History",
    "engagement_event",
    "generate",
    "interleave",
]

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

# The first deal is created then; the histories run for about ten months.
EPOCH = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
SPAN = timedelta(days=270)
SOURCE = "crm"

BANT = ("budget", "authority", "need", "timeline")
ENGAGEMENT = (
    "email.sent",
    "email.opened",
    "email.opened",
    "email.replied",
    "link.clicked",
    "content.downloaded",
    "meeting.booked",
    "meeting.held",
    "meeting.no_show",
)
LOST_REASONS = (
    "Chose a competitor",
    "Budget moved to another project",
    "No decision before the fiscal year end",
    "Price above the approved range",
)
DISQUALIFIERS = ("no_budget", "no_authority", "no_urgency", "no_fit", "no_process")
COMPANIES = (
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Tyrell",
    "Cyberdyne",
    "Soylent",
)
PRODUCTS = ("platform", "analytics add-on", "renewal", "expansion", "pilot")
CURRENCIES = ("EUR", "EUR", "EUR", "USD", "GBP")
AGENDAS = (
    "Demo for the buying group",
    "Technical deep dive",
    "Business case review",
    "Security questionnaire walk-through",
)


@dataclass(frozen=True, slots=True)
class History:
    """One deal: its id, how it ends and its events in order (API payloads)."""

    deal_id: str
    outcome: str  # won | open | lost | disqualified
    events: list[dict[str, Any]]


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _core_steps(rng: random.Random, owner: str) -> list[tuple[str, dict[str, Any]]]:
    """The prospect actions and facts that take a deal from created to won."""
    bant = list(BANT)
    rng.shuffle(bant)
    amount = rng.randrange(5, 250) * 1000
    return [
        (
            "deal.created",
            {
                "owner": owner,
                "amount": amount,
                "currency": rng.choice(CURRENCIES),
                "name": f"{rng.choice(COMPANIES)} {rng.choice(PRODUCTS)}",
            },
        ),
        ("discovery_call.agreed", {}),
        *[
            ("qualification.updated", {"criterion": c, "status": "confirmed"})
            for c in bant
        ],
        ("pain.shared", {"note": "Month-end reporting takes the team a week"}),
        ("next_step.confirmed", {}),  # dated when its time is known
        ("stakeholder.invited", {}),
        ("value.agreed", {}),
        ("proposal.requested", {}),
        ("decision_process.mapped", {"note": "CFO signs above the VP's limit"}),
        ("procurement.introduced", {}),
        ("contract.signed", {}),
    ]


def _ending(
    rng: random.Random, outcome: str, core: list[tuple[str, dict[str, Any]]]
) -> tuple[list[tuple[str, dict[str, Any]]], tuple[str, dict[str, Any]] | None]:
    """The core steps a deal of this outcome gets through, and its last event."""
    if outcome == "won":
        return core, None
    if outcome == "open":  # stalled after the creation, before the signature
        return core[: rng.randint(2, len(core) - 1)], None
    if outcome == "lost":
        reached = core[: rng.randint(6, len(core) - 1)]
        return reached, ("deal.lost", {"reason": rng.choice(LOST_REASONS)})
    reached = core[: rng.randint(2, 10)]
    if rng.random() < 0.5:
        reason = rng.choice(DISQUALIFIERS)
        return reached, ("disqualifier.identified", {"reason": reason})
    criterion = rng.choice(BANT)
    data: dict[str, Any] = {"criterion": criterion, "status": "none"}
    if criterion in ("budget", "authority"):
        data["path"] = False
    return reached, ("qualification.updated", data)


def _outcome(rng: random.Random) -> str:
    draw = rng.random()
    if draw < 0.45:
        return "won"
    if draw < 0.85:
        return "open"
    if draw < 0.94:
        return "lost"
    return "disqualified"


def _history(
    rng: random.Random, deal_id: str, index: int, deal_count: int, length: int
) -> History:
    owner = f"rep-{rng.randrange(1, 26):02d}"
    outcome = _outcome(rng)
    steps, last = _ending(rng, outcome, _core_steps(rng, owner))

    # Engagement fills the history to its length; it goes anywhere after the
    # creation and before the signature or the last event.
    fill = length - len(steps) - (last is not None)
    if fill < 0:
        raise ValueError(f"a history of {length} events is too short")
    steps = list(steps)
    stop = len(steps) - (outcome == "won")
    for _ in range(fill):
        if rng.random() < 0.08:
            filler: tuple[str, dict[str, Any]] = (
                "deal.updated",
                {"amount": rng.randrange(5, 250) * 1000},
            )
        else:
            filler = (rng.choice(ENGAGEMENT), {})
        position = rng.randint(1, stop)
        steps.insert(position, filler)
        stop += 1
    if last is not None:
        steps.append(last)

    start = EPOCH + SPAN * index / deal_count + timedelta(minutes=rng.randrange(600))
    moment = start
    events = []
    for number, (type_, data) in enumerate(steps, start=1):
        if number > 1:
            moment += timedelta(minutes=rng.randrange(30, 60 * 48))
        if type_ == "next_step.confirmed":
            day = (moment + timedelta(days=rng.randrange(2, 15))).date()
            data = {
                "date": day.isoformat(),
                "agenda": rng.choice(AGENDAS),
                "attendees": [
                    f"{role}@{deal_id}.example"
                    for role in rng.sample(["cfo", "cto", "vp.ops", "it.lead"], 2)
                ],
            }
        event: dict[str, Any] = {
            "event_id": f"{deal_id}-{number:03d}",
            "type": type_,
            "deal_id": deal_id,
            "occurred_at": _iso(moment),
            "source": SOURCE,
            "data": data,
        }
        if type_ not in ENGAGEMENT:  # logged by the rep; signals are tracked
            event["actor"] = owner
        events.append(event)
    return History(deal_id, outcome, events)


def generate(
    seed: int, deal_count: int, events_per_deal: int, prefix: str = "deal"
) -> list[History]:
    """`deal_count` histories of `events_per_deal` events each, from the seed.

    Deal ids are `<prefix>-000000`, `<prefix>-000001`, ...; event ids are the
    deal id and the event's number in the deal, `deal-000000-001`.
    """
    rng = random.Random(seed)
    return [
        _history(rng, f"{prefix}-{i:06d}", i, deal_count, events_per_deal)
        for i in range(deal_count)
    ]


def interleave(histories: list[History]) -> list[dict[str, Any]]:
    """Every event of every deal in the order they happened.

    Ties keep each deal's own order: within a deal, times strictly increase.
    """
    keyed = [
        (event["occurred_at"], deal, number, event)
        for deal, history in enumerate(histories)
        for number, event in enumerate(history.events)
    ]
    keyed.sort(key=lambda item: item[:3])
    return [item[3] for item in keyed]


def engagement_event(
    rng: random.Random, deal_id: str, event_id: str, occurred_at: datetime
) -> dict[str, Any]:
    """A tracked engagement signal for a deal, at the given time."""
    return {
        "event_id": event_id,
        "type": rng.choice(ENGAGEMENT),
        "deal_id": deal_id,
        "occurred_at": _iso(occurred_at),
        "source": SOURCE,
        "data": {},
    }
