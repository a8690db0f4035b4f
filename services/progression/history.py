"""A generated sales history, as a CRM would have posted it.

`generate` writes the inputs of a team's past deals (never a `stage.changed`:
the service decides those), for demonstrations, the what-if worked example
and tests. It is deterministic: the same seed and number of deals give the
same events, and the first N deals of a larger history are the history of
N deals. Every event occurred before `EPOCH`, a fixed moment in the past,
so a generated history is accepted by the service whatever today's date.

The deals follow what prospects do, not a process: an outbound lead may
never answer, an inbound lead often arrives ready to talk pricing (highly
engaged, need confirmed) while its budget is still unknown. Under
`b2b-default` such a deal waits in `connecting` until the budget is
confirmed; under `inbound-fast-track` its lead score carries it on. Some
deals drop out at every step (lost, disqualified, or gone quiet), and the
most recent ones are still open at the epoch.
"""

from __future__ import annotations

__all__ = ["EPOCH", "SPAN_DAYS", "generate"]

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

# Every generated event occurred before this moment.
EPOCH = datetime(2026, 7, 1, tzinfo=UTC)
# Deals are created over this many days before the epoch.
SPAN_DAYS = 240
# The CRM mapping moved to next_step.confirmed version 2 (attendees as
# people) this many days before the epoch; older deals post version 1.
NEXT_STEP_V2_DAYS = 90

OWNERS = ("ana", "ben", "chloe", "dev", "emma", "farid", "grace", "hugo")
LOSS_REASONS = ("chose a competitor", "no decision", "price", "project cancelled")
COMPANIES = (
    "Acme",
    "Borealis",
    "Cobalt",
    "Dunmore",
    "Elstree",
    "Fjord",
    "Granite",
    "Halcyon",
    "Ironbark",
    "Juniper",
    "Kestrel",
    "Lumen",
)


@dataclass
class _Deal:
    """One deal's inputs, dated in days after its creation."""

    deal_id: str
    created_at: datetime
    rng: random.Random
    source: str
    inputs: list[tuple[float, str, dict[str, Any], int]] = field(default_factory=list)
    day: float = 0.0

    def after(self, low: float, high: float) -> float:
        """Move the deal's clock on by a random number of days."""
        self.day += self.rng.uniform(low, high)
        return self.day

    def add(
        self,
        type_: str,
        day: float | None = None,
        schema_version: int = 1,
        **data: Any,
    ) -> None:
        moment = self.day if day is None else day
        self.inputs.append((moment, type_, data, schema_version))

    def qualify(
        self, criterion: str, status: str, day: float | None = None, **extra: Any
    ) -> None:
        self.add(
            "qualification.updated", day, criterion=criterion, status=status, **extra
        )

    def drop(self, stage: str) -> None:
        """The deal goes no further: lost, disqualified, or simply quiet."""
        outcome = self.rng.random()
        self.after(2, 20)
        if outcome < 0.55:
            self.add("deal.lost", reason=self.rng.choice(LOSS_REASONS))
        elif outcome < 0.65 and stage != "prospecting":
            self.add("disqualifier.identified", reason="no_process")
        # else: the prospect stopped answering and the deal stays open

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


def _deal_inputs(deal: _Deal, owner: str, amount: int, company: str) -> None:
    """The prospect's journey, step by step, with a chance to stop at each."""
    rng = deal.rng
    inbound = deal.source == "inbound"
    # Pricing-ready inbound leads: they found us and want a number.
    ready = inbound and deal.chance(0.6)
    deal.add(
        "deal.created",
        owner=owner,
        amount=amount,
        currency="EUR",
        name=f"{company} ({deal.source})",
    )

    # Engagement before the first call: it makes up the lead score.
    if ready:
        for type_ in ("content.downloaded", "link.clicked", "email.opened"):
            deal.add(type_, deal.after(0, 0.3))
        deal.add("email.opened", deal.after(0, 0.3))
        deal.add("email.replied", deal.after(0, 0.5))
    elif inbound:
        deal.add("content.downloaded", deal.after(0, 0.5))
        if deal.chance(0.5):
            deal.add("email.opened", deal.after(0, 1))
    else:
        for _ in range(rng.randint(1, 3)):
            deal.add("email.sent", deal.after(0.5, 3))
            if deal.chance(0.45):
                deal.add("email.opened", deal.after(0, 1))
        if deal.chance(0.35):
            deal.add("email.replied", deal.after(0, 2))

    # Prospecting: the prospect agrees to a discovery call, or never does.
    if not deal.chance(0.95 if inbound else 0.6):
        deal.drop("prospecting")
        return
    deal.add("discovery_call.agreed", deal.after(*((0.1, 1.5) if inbound else (1, 6))))
    deal.add("meeting.booked", deal.after(0, 2))
    if deal.chance(0.12):
        deal.add("meeting.no_show", deal.after(0.5, 1.5))
    deal.add("meeting.held", deal.after(0.2, 3))

    # Connecting: BANT on the call; the budget is often unknown for inbound.
    deal.after(0, 1)
    need = rng.choices(["confirmed", "unknown", "none"], [88, 7, 5])[0]
    deal.qualify("need", need)
    if need == "none":
        return  # b2b-default disqualifies the deal: no fit
    authority_late = not deal.chance(0.75)
    deal.qualify("authority", "unknown" if authority_late else "confirmed")
    timeline = rng.choices(["confirmed", "unknown", "none"], [86, 10, 4])[0]
    deal.qualify("timeline", timeline)
    if timeline == "none":
        return  # no urgency: disqualified
    budget_weights = [50, 50, 0] if ready else [68, 24, 8]
    budget = rng.choices(["confirmed", "unknown", "none"], budget_weights)[0]
    if budget == "none":
        has_path = deal.chance(0.5)
        deal.qualify("budget", "none", path=has_path)
        if not has_path:
            return  # no budget and no way to get one: disqualified
        budget = "unknown"
    else:
        deal.qualify("budget", budget)
    budget_later = budget == "unknown" and deal.chance(0.65)
    if timeline == "unknown" and deal.chance(0.5):
        deal.qualify("timeline", "confirmed", deal.after(1, 6))
    if need == "unknown" or not deal.chance(0.92):
        deal.drop("connecting")
        return
    deal.add("pain.shared", deal.after(0.5, 3 if inbound else 6))

    # Researching: a dated next step, then the buying group is invited.
    deal.after(1, 5)
    lead = f"lead@{company.lower()}.example"
    v2 = deal.created_at + timedelta(days=deal.day) >= EPOCH - timedelta(
        days=NEXT_STEP_V2_DAYS
    )
    deal.add(
        "next_step.confirmed",
        schema_version=2 if v2 else 1,
        date=(deal.created_at + timedelta(days=deal.day + 7)).date().isoformat(),
        agenda="Demo on the prospect's use case",
        attendees=[{"email": lead, "role": "Head of operations"}] if v2 else [lead],
    )
    if not deal.chance(0.85):
        deal.drop("researching")
        return
    deal.add("stakeholder.invited", deal.after(1, 10 if inbound else 14))
    deal.add("meeting.booked", deal.after(0, 2))
    deal.add("meeting.held", deal.after(1, 5))
    deal.add("email.sent", deal.after(0, 1))
    if deal.chance(0.7):
        deal.add("email.opened", deal.after(0, 2))

    # Presenting: value agreed, then a formal proposal is requested.
    if deal.chance(0.85):
        deal.add("value.agreed", deal.after(1, 7))
    if budget_later:
        deal.qualify("budget", "confirmed", deal.after(0, 4))
    # A budget never confirmed in the CRM stops half of those deals here;
    # the others go on to sign all the same.
    unfunded = budget == "unknown" and not budget_later and deal.chance(0.5)
    if unfunded or not deal.chance(0.85):
        deal.drop("presenting")
        return
    deal.add("proposal.requested", deal.after(0.5, 5))
    deal.add("email.sent", deal.after(0, 2))
    deal.add("email.opened", deal.after(0, 2))

    # Negotiating: the decision process is mapped, procurement comes in.
    if authority_late and deal.chance(0.85):
        deal.qualify("authority", "confirmed", deal.after(0.5, 4))
    if deal.chance(0.9):
        deal.add("decision_process.mapped", deal.after(1, 6))
    if not deal.chance(0.82):
        deal.drop("negotiating")
        return
    deal.add("procurement.introduced", deal.after(1, 8))

    # Closing: the contract is signed, or it falls through at the end.
    if not deal.chance(0.8):
        deal.drop("closing")
        return
    deal.add("contract.signed", deal.after(2, 12))


def _envelopes(deal: _Deal) -> list[dict[str, Any]]:
    """The deal's inputs as posted envelopes, in the order they arrive.

    Webhooks are not delivered in order: now and then an event arrives just
    after the one that followed it. Events dated after the epoch have not
    happened yet and are left out.
    """
    dated = sorted(
        (deal.created_at + timedelta(days=day), n, type_, data, version)
        for n, (day, type_, data, version) in enumerate(deal.inputs)
    )
    arrival = [item for item in dated if item[0] < EPOCH]
    for i in range(len(arrival) - 1):
        if deal.rng.random() < 0.04:
            arrival[i], arrival[i + 1] = arrival[i + 1], arrival[i]
    envelopes = []
    for moment, n, type_, data, version in arrival:
        envelope: dict[str, Any] = {
            "event_id": f"{deal.deal_id}.{n:02d}",
            "type": type_,
            "deal_id": deal.deal_id,
            "occurred_at": moment.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "source": "crm",
            "data": data,
        }
        if version != 1:
            envelope["schema_version"] = version
        envelopes.append(envelope)
    return envelopes


def generate(deals: int, seed: int) -> Iterator[dict[str, Any]]:
    """The posted envelopes of `deals` deals, deal after deal, in arrival order."""
    if deals < 0:
        raise ValueError(f"deals must be 0 or more, not {deals}")
    for index in range(deals):
        rng = random.Random(f"dealledger-history:{seed}:{index}")
        created_at = (EPOCH - timedelta(days=rng.uniform(1, SPAN_DAYS))).replace(
            microsecond=0
        )
        source = "inbound" if rng.random() < 0.45 else "outbound"
        deal = _Deal(f"s{seed}-deal-{index:05d}", created_at, rng, source)
        _deal_inputs(
            deal,
            owner=rng.choice(OWNERS),
            amount=rng.randrange(4, 80) * 1000,
            company=rng.choice(COMPANIES),
        )
        yield from _envelopes(deal)
