"""Rule 7: without terminal events, arrival order changes no decision.

The property holds for histories whose evidence is settled: each prospect
action at most once, and for each exit criterion at most one event that
makes it hold, dated after anything that contradicts it. No engine over an
append-only log can promise more: a second, earlier copy of evidence that
arrives after the advance it would have moved cannot move a recorded
decision (see docs/decisions.md, "Order independence").
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from .engine_support import Deal, Input, at

ACTIONS = [
    "discovery_call.agreed",
    "pain.shared",
    "stakeholder.invited",
    "proposal.requested",
    "procurement.introduced",
    "contract.signed",
]
SIGNALS = ["email.opened", "email.replied", "link.clicked", "meeting.held"]


@st.composite
def settled_histories(draw: st.DrawFn) -> list[Input]:
    """A b2b-default history with distinct times and no loss or disqualifier."""
    count = 40
    hours = iter(draw(st.permutations(range(1, count + 1))))
    items = [Input("created", "deal.created", at(next(hours)), {"owner": "r"})]
    for action in ACTIONS:
        if draw(st.integers(0, 9)) or action == "discovery_call.agreed":
            items.append(Input(f"a-{action}", action, at(next(hours))))
    for criterion in ("budget", "authority", "need", "timeline"):
        times = sorted(next(hours) for _ in range(draw(st.integers(0, 2))))
        for i, hour in enumerate(times):
            items.append(
                Input(
                    f"q-{criterion}-u{i}",
                    "qualification.updated",
                    at(hour),
                    {"criterion": criterion, "status": "unknown"},
                )
            )
        if draw(st.integers(0, 9)):  # mostly confirmed, so deals get far
            hour = max([*times, 0]) + count + 1 + len(items)
            items.append(
                Input(
                    f"q-{criterion}-yes",
                    "qualification.updated",
                    at(hour),
                    {"criterion": criterion, "status": "confirmed"},
                )
            )
    if draw(st.integers(0, 9)):
        items.append(
            Input(
                "next",
                "next_step.confirmed",
                at(next(hours)),
                {"date": "2026-04-01", "agenda": "Demo", "attendees": ["x"]},
            )
        )
    for fact in ("value.agreed", "decision_process.mapped"):
        if draw(st.integers(0, 9)):
            items.append(Input(f"f-{fact}", fact, at(next(hours))))
    for i in range(draw(st.integers(0, 4))):
        items.append(Input(f"s-{i}", draw(st.sampled_from(SIGNALS)), at(next(hours))))
    return items


def outcome(deal: Deal) -> list[tuple[str | None, str, object]]:
    return [(d.from_stage, d.to, d.effective_at) for d in deal.decisions]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), history=settled_histories())
def test_the_decisions_do_not_depend_on_arrival_order(
    data: st.DataObject, history: list[Input]
) -> None:
    reordered = data.draw(st.permutations(history))
    in_order = Deal().post_all(history)
    shuffled = Deal().post_all(reordered)
    assert shuffled.where == in_order.where
    assert outcome(shuffled) == outcome(in_order)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), history=settled_histories())
def test_deciding_again_after_any_prefix_changes_nothing(
    data: st.DataObject, history: list[Input]
) -> None:
    from progression.decision import decide

    deal = Deal()
    for item in data.draw(st.permutations(history)):
        deal.post(item)
        process = deal.process
        if process is not None:
            assert decide(deal.stream, process) == []


@st.composite
def fast_track_histories(draw: st.DrawFn) -> list[Input]:
    """inbound-fast-track: `any` over BANT and the lead score, settled evidence.

    A lead score reached by more signals than it needs, or both alternatives
    of the `any` holding, is redundant evidence: which of them decided the
    advance depends on what arrived first, the limitation docs/decisions.md
    names.
    """
    hours = iter(draw(st.permutations(range(1, 41))))
    items = [
        Input(
            "created",
            "deal.created",
            at(next(hours)),
            {"owner": "r", "process": "inbound-fast-track"},
        )
    ]
    for action in (
        "pain.shared",
        "proposal.requested",
        "procurement.introduced",
        "contract.signed",
    ):
        if draw(st.integers(0, 9)):
            items.append(Input(f"a-{action}", action, at(next(hours))))
    # One way into pricing at most: budget confirmed, or a lead score of 40.
    path = draw(st.sampled_from(["budget", "score", "neither"]))
    for criterion in ("budget", "authority", "need"):
        if criterion == "budget" and path != "budget":
            continue
        if draw(st.integers(0, 3)):
            items.append(
                Input(
                    f"q-{criterion}",
                    "qualification.updated",
                    at(next(hours)),
                    {"criterion": criterion, "status": "confirmed"},
                )
            )
    if draw(st.integers(0, 9)):
        items.append(
            Input(
                "next",
                "next_step.confirmed",
                at(next(hours)),
                {"date": "2026-04-01", "agenda": "Demo", "attendees": ["x"]},
            )
        )
    # Settled evidence for the lead score: never more signals than it takes
    # to reach the threshold of 40, so it is crossed by the last of them.
    points = {
        "meeting.held": 20,
        "link.clicked": 10,
        "content.downloaded": 10,
        "email.replied": 10,
    }
    ceiling = 40 if path == "score" else 30
    total = 0
    for i in range(draw(st.integers(0, 6))):
        signal = draw(st.sampled_from(sorted(points)))
        if total + points[signal] > ceiling:
            break
        total += points[signal]
        items.append(Input(f"s-{i}", signal, at(next(hours))))
    return items


@settings(max_examples=300, deadline=None)
@given(data=st.data(), history=fast_track_histories())
def test_the_fast_track_does_not_depend_on_arrival_order(
    data: st.DataObject, history: list[Input]
) -> None:
    reordered = data.draw(st.permutations(history))
    assert outcome(Deal().post_all(reordered)) == outcome(Deal().post_all(history))
